"""Peak memory of this process, per measured section (CPU or CUDA), for the benchmarks.

CUDA: `torch.cuda.max_memory_allocated` since the last reset. CPU: the kernel's high-water mark
of resident memory (VmHWM), reset by writing 5 to /proc/self/clear_refs; where that is not
allowed, the resident size sampled every 10 ms by a background thread.
"""

from __future__ import annotations

import threading
from pathlib import Path


class PeakMemory:
    """Peak memory of this process since the last `reset()`, in MiB (see the module doc)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.method = "cuda max_memory_allocated" if self.cuda else "VmHWM after clear_refs"
        self._thread = None
        self._peak_kb = 0
        self._stop = threading.Event()
        self.start_mb = 0.0  # memory in use at the last reset
        if not self.cuda and not self._clear_refs():
            self.method = "RSS sampled every 10 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    @staticmethod
    def _clear_refs() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def _sample(self):
        while not self._stop.wait(0.01):
            try:
                self._peak_kb = max(self._peak_kb, self._status_kb("VmRSS"))
            except OSError:
                return

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
            return
        if self._thread is None:
            self._clear_refs()
        else:
            self._peak_kb = self._status_kb("VmRSS")
        self.start_mb = self._status_kb("VmRSS") / 1024

    def peak_mb(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self._thread is None:
            return self._status_kb("VmHWM") / 1024
        return max(self._peak_kb, self._status_kb("VmRSS")) / 1024

    def close(self) -> None:
        self._stop.set()
