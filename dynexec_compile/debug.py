"""``DYNEXEC_DEBUG_DIR``: every graph before and after every pass, as readable text."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch.fx as fx

_compile_ids = itertools.count()


class GraphDumper:
    """Writes ``<dir>/<compile>/<step>.<name>.txt`` (readable code and the node table)."""

    def __init__(self, directory: str | None):
        self.dir: Path | None = None
        if directory:
            self.dir = Path(directory) / f"compile{next(_compile_ids):03d}_pid{os.getpid()}"
            self.dir.mkdir(parents=True, exist_ok=True)
        self._step = itertools.count()

    def dump(self, gm: fx.GraphModule, name: str) -> None:
        if self.dir is None:
            return
        text = [f"# {name}", "", gm.print_readable(print_output=False, include_stride=True), "", "# nodes"]
        text += [node.format_node() or "" for node in gm.graph.nodes]
        (self.dir / f"{next(self._step):02d}.{name}.txt").write_text("\n".join(text))
