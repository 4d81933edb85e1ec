"""`facetrain COMMAND [options]`: one command for every stage, from photos to an exported model.

    facetrain pack SRC [SRC ...] --out DATA        pack face images into RecordIO shards + manifest
    facetrain pack SRC ... --out DATA --part K/N   one of N machines' share; then `facetrain merge DATA`
    facetrain verify DATA                          check every shard, index entry and checksum
    maskgen build --ratio 0.05 --data DATA         add masked copies (its own command)
    facetrain train --config CONFIG --data DATA --output RUN [key=value ...]
    facetrain eval --checkpoint RUN/model.pt --pairs lfw.bin
    facetrain embed --checkpoint RUN/model.pt --images DIR --out faces.npz
    facetrain export --checkpoint RUN/model.pt [--format onnx,torchscript,insightface]
    facetrain flops --network r50 mbf [--size 112]
    facetrain convert to-insightface|from-insightface SRC OUT [--network NAME]

Training on several GPUs (torchrun is `python -m torch.distributed.run`); any of these starts the same
trainer in every process:

    python -m torch.distributed.run --nproc_per_node=8 --no-python facetrain train --config ...
    python -m torch.distributed.run --nproc_per_node=8 -m trainer --config ...
    python -m torch.distributed.run --nproc_per_node=8 trainer/main.py --config ...

`facetrain COMMAND --help` shows a command's options and their defaults. Each command is also a module
(`python -m pipeline`, `python -m trainer`, `python -m trainer.eval`, ...). The contracts between the
stages (packed dataset layout, command output, model.pt) are in docs/design.md.
"""
from __future__ import annotations

import importlib
import sys
from typing import NamedTuple, Optional, Sequence


class Command(NamedTuple):
    module: str  # whose main(argv) runs the command
    summary: str
    leading: tuple[str, ...] = ()  # arguments put before the user's (a sub-command of that module)
    takes_prog: bool = True  # whether its main() accepts prog= for its usage line


COMMANDS: dict[str, Command] = {
    "pack": Command("pipeline.__main__", "pack face images into shuffled RecordIO shards + manifest",
                    ("pack",)),
    "merge": Command("pipeline.__main__", "join the parts of a `pack --part K/N` run into one dataset",
                     ("merge",)),
    "verify": Command("pipeline.__main__", "check a packed dataset's shards, indexes and checksums",
                      ("verify",)),
    "train": Command("trainer.main", "train a backbone (DDP + Partial FC); runs under torch.distributed.run",
                     takes_prog=False),
    "eval": Command("trainer.eval.__main__", "verification (pairs, TAR@FAR) and identification of checkpoints"),
    "embed": Command("trainer.eval.embed", "embeddings of every image of a folder, to a .npz"),
    "export": Command("trainer.model_io.export", "model.pt to ONNX, TorchScript or insightface's backbone.pth"),
    "flops": Command("trainer.model_io.flops", "parameters and GMACs of named backbones"),
    "convert": Command("trainer.model_io.convert", "backbone weights to and from insightface's arcface_torch",
                       takes_prog=False),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {c.summary}" for name, c in COMMANDS.items()]
    return ("usage: facetrain COMMAND [options]   (facetrain COMMAND --help for its options)\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n" + __doc__)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"facetrain: unknown command {name!r}; choose from {', '.join(COMMANDS)} "
              "(masked copies: the `maskgen` command)", file=sys.stderr)
        return 2
    prog = f"facetrain {name}"
    # A parser that takes its name from argv[0] (the trainer's) names the sub-command in its usage line.
    sys.argv = [prog, *rest]
    run = importlib.import_module(command.module).main
    if command.leading:
        return run([*command.leading, *rest], prog="facetrain")  # its sub-parser appends the name
    return run(rest, prog=prog) if command.takes_prog else run(rest)


if __name__ == "__main__":
    sys.exit(main())
