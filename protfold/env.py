"""Where a record was made: the environment every benchmark record and every training run's perf.json carry.

Below `train` and `bench`, so both read it without importing each other.
"""

from __future__ import annotations

import datetime
import shlex
import sys

import torch


def environment(device: torch.device, argv: list[str] | None) -> dict[str, str]:
    """Card name, torch version, the command line and the date: carried by every record and the table."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    command = "protfold bench " + shlex.join(argv) if argv is not None else shlex.join(sys.argv)
    return {
        "device": str(device),
        "card": card,
        "torch": torch.__version__,
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


__all__ = ["environment"]
