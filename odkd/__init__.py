"""odkd: orderly dual-teacher knowledge distillation for lightweight human-pose networks."""

from importlib.metadata import PackageNotFoundError, version

from odkd.errors import OdkdError

try:
    __version__ = version("odkd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

__all__ = ["OdkdError", "__version__"]
