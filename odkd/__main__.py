"""`python -m odkd`, which is how torchrun starts it: torchrun -m odkd train-student ..."""

from odkd.cli import main

main()
