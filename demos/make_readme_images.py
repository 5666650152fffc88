"""Pictures for the README: the dashboard and the TensorBoard view of a real (short) training run.

    python demos/make_readme_images.py                 # docs/img/dashboard.png (+ the run in runs/readme)
    python demos/make_readme_images.py --tensorboard   # also docs/img/tensorboard.png (needs chromium)

The run: a 64-128-64-10 MLP on scikit-learn's 8x8 digits (shipped with scikit-learn, nothing is
downloaded), plain SGD, 10% of the training labels flipped, the "full" instrument preset plus TracIn
self-influence, TensorBoard and Dashboard sinks. The TensorBoard picture is a headless-browser screenshot of a local
``tensorboard --logdir`` (127.0.0.1 only); without chromium it is skipped with a message.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cockpit_lite.instruments import TracIn  # noqa: E402
from cockpit_lite.instruments.presets import full  # noqa: E402

from cockpit_lite import Cockpit, load  # noqa: E402
from cockpit_lite.figure import DashboardFigure  # noqa: E402
from cockpit_lite.sinks import Dashboard, TensorBoard  # noqa: E402
from cockpit_lite.sinks.dashboard import write_atomic  # noqa: E402


def digits(noise: float = 0.1, seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    y = y.copy()
    flip = rng.random(len(y)) < noise
    y[flip] = (y[flip] + rng.integers(1, 10, flip.sum())) % 10
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def train(logdir: Path, epochs: int = 12, batch: int = 64, lr: float = 0.1, seed: int = 0) -> Cockpit:
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # a tiny model: more threads only add synchronisation (and noise on a busy machine)
    x, y = digits(seed=seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    sinks = [
        TensorBoard(logdir, image_every=100, image_min_s=0),
        Dashboard(logdir / "dashboard.png", every_s=5),
    ]
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True, generator=gen)
    instruments = full() + [TracIn()]  # self-influence: which training examples the run finds hardest
    with Cockpit(model, optimizer, loss_fn, instruments=instruments, logdir=logdir, sinks=sinks) as cockpit:
        for _ in range(epochs):
            for xb, yb in cockpit.track(loader):  # the same batches; the cockpit learns their indices
                optimizer.zero_grad()
                loss_fn(model(xb), yb).backward()
                optimizer.step()
    return cockpit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboard_screenshot(logdir: Path, out: Path, page: str = "custom_scalars") -> bool:
    """Screenshot of ``tensorboard --logdir`` (local only) with a headless chromium; False if impossible."""
    browser = next((b for b in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
                    if shutil.which(b)), None)  # fmt: skip
    if browser is None:
        print("no chromium found: skipping the TensorBoard screenshot (apt-get install chromium-headless-shell)")
        return False
    port = _free_port()
    tb = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(120):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(3)  # let it load the event files
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1500,1100",
               "--virtual-time-budget=20000", f"--screenshot={out}", f"http://127.0.0.1:{port}/#{page}"]  # fmt: skip
        subprocess.run(cmd, check=True, timeout=180, capture_output=True)
        return out.exists()
    finally:
        tb.terminate()
        tb.wait(timeout=30)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logdir", default=str(ROOT / "runs" / "readme"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--tensorboard", action="store_true", help="also take the TensorBoard screenshot")
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args(argv)
    logdir, out = Path(args.logdir), Path(args.out)
    shutil.rmtree(logdir, ignore_errors=True)
    t0 = time.perf_counter()
    cockpit = train(logdir, epochs=args.epochs)
    print(f"trained {cockpit.step} steps in {time.perf_counter() - t0:.1f} s; run in {logdir}")
    write_atomic(
        out / "dashboard.png",
        DashboardFigure(title="sklearn digits, 64-128-64-10 MLP, SGD lr 0.1, 10% flipped labels").png(load(logdir)),
    )
    print(f"wrote {out / 'dashboard.png'}")
    if args.tensorboard and tensorboard_screenshot(logdir.parent, out / "tensorboard.png"):
        print(f"wrote {out / 'tensorboard.png'}")
    os.sync()


if __name__ == "__main__":
    main()
