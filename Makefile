PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: test demo install clean

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(VENV_STAMP)

install: $(VENV_STAMP)

test: $(VENV_STAMP)
	$(PY) -m pytest

demo: $(VENV_STAMP)
	.venv/bin/odkd demo --config pipeline/demo.toml

clean:
	rm -rf .venv runs data
