"""Where training metrics go: a progress display, metrics.jsonl, TensorBoard, and a loss plot.

Only the main rank writes. Records are plain dicts with ``step`` and ``tokens``; on resume every
sink drops what was logged after the checkpoint's step, so a resumed run's files read as if it had
never stopped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from clusterlm.config import MetricsConfig
from clusterlm.files import atomic_write, atomic_write_with


class ProgressDisplay:
    """A tqdm bar on a terminal (step, loss, LR, tokens/s, MFU, ETA), or one line per log."""

    def __init__(self, mode: str, total_steps: int, start_step: int):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total = mode, total_steps
        self.bar = None
        self.start_time, self.start_step = time.perf_counter(), start_step
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, record: dict[str, Any]) -> None:
        summary = {
            "loss": f"{record['loss']:.4f}",
            "lr": f"{record['lr']:.2e}",
            "tok/s": f"{record['tokens_per_s']:,.0f}",
        }
        if record.get("mfu") is not None:
            summary["mfu"] = f"{100 * record['mfu']:.1f}%"
        if self.bar is not None:
            self.bar.n = step + 1
            self.bar.set_postfix(summary, refresh=True)
        elif self.mode == "lines":
            done = step + 1 - self.start_step
            eta = (time.perf_counter() - self.start_time) / max(done, 1) * (self.total - step - 1)
            fields = " ".join(f"{k} {v}" for k, v in summary.items())
            print(
                f"step {step + 1}/{self.total} {fields} eta {eta:.0f}s", file=sys.stderr, flush=True
            )

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.mode != "none":
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsSinks:
    """metrics.jsonl, TensorBoard scalars and the final plot, for the main rank."""

    def __init__(self, cfg: MetricsConfig, out_dir: Path, start_step: int):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self.records = self._records_before(start_step)
        self.jsonl = None
        if cfg.jsonl:
            self._rewrite_jsonl()
            self.jsonl = open(self.jsonl_path, "a")
            # When training (re)started: wall-clock times of later records are measured from here.
            self.jsonl.write(
                json.dumps({"kind": "start", "step": start_step, "time": time.time()}) + "\n"
            )
        self.tensorboard = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events after the resumed step in TensorBoard's view.
            self.tensorboard = SummaryWriter(
                str(self.out_dir / "tensorboard"), purge_step=start_step + 1
            )

    def _records_before(self, start_step: int) -> list[dict[str, Any]]:
        if start_step == 0 or not self.jsonl_path.is_file():
            return []
        kept = []
        for line in self.jsonl_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if record.get("step", 0) <= start_step:
                kept.append(record)
        return kept

    def _rewrite_jsonl(self) -> None:
        atomic_write(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict[str, Any]) -> None:
        record = {**record, "time": time.time()}
        self.records.append(record)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "kind", "time") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> Path | None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        return plot_losses(self.records, self.out_dir / "loss.png") if self.cfg.plot else None


def plot_losses(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Train and validation loss against tokens seen, as a PNG."""
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "eval"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(
            [r["tokens"] for r in train], [r["loss"] for r in train], label="train", linewidth=1
        )
    if val:
        ax.plot(
            [r["tokens"] for r in val],
            [r["val_loss"] for r in val],
            label="val",
            marker="o",
            linewidth=1.5,
        )
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
