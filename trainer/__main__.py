"""`python -m trainer ...`: the training entry point (trainer/main.py), also as a module, so that
`python -m torch.distributed.run --nproc_per_node=N -m trainer --config ...` starts it on every rank."""
import sys

from trainer.main import main

if __name__ == "__main__":
    sys.argv[0] = "python -m trainer"  # the usage line, instead of ".../__main__.py"
    sys.exit(main())
