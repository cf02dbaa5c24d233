"""How fast `mmsenti features extract` turns clips into features (issue 27's goal: audio + vision together at least
10x real time on 2 cores, at 5 frames a second).

    python benchmarks/extract.py                       # 40 generated clips of 640x360 at 25 fps, 1 and 2 workers
    python benchmarks/extract.py --clips 12 --size 1280x720

The clips are generated (scikit-image's astronaut photograph moving across the frame, speech by espeak-ng: no
MOSI/MOSEI clip exists here), H.264 + AAC as a phone or YouTube clip would be. Printed, per extractor setting and
together: seconds of video per second of wall time with 1 and 2 worker processes (start-up included, as a user
sees it) and in steady state (the workers' time on the clips alone), then where one worker's time goes per second
of video: decoding the audio, openSMILE, decoding the frames, the face/eye/smile cascades, the EfficientNet-Lite0
embedding.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import describe_cpu, physical_cores  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=40, help="clips (about 4.5 s each; enough that start-up is small)")
    p.add_argument("--size", default="640x360", help="frame size WxH of the generated clips")
    p.add_argument("--source-fps", type=int, default=25, help="frame rate of the generated clips")
    p.add_argument("--fps", type=float, default=5.0, help="frames read a second (vision.fps)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()

    import cv2
    import numpy as np
    import torch

    import mmsenti  # noqa: F401  (compat shims first)
    from mmsenti.data.video.decode import iter_frames, read_audio
    from mmsenti.data.video.extraction import Extraction, ExtractionConfig
    from mmsenti.data.video.job import extract_features
    from mmsenti.data.video.synthetic import SENTENCES, espeak_available, make_clip

    torch.set_num_threads(1)  # the 1-worker column runs in this process: one core, as each worker process has
    cv2.setNumThreads(1)
    if not espeak_available():
        sys.exit("extract.py: needs espeak-ng for the generated clips (apt-get install espeak-ng)")
    w, h = (int(v) for v in args.size.split("x"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(describe_cpu())
    print(f"{physical_cores()} physical cores, load average {load:.2f} before the run; clips {args.clips} x "
          f"{w}x{h} at {args.source_fps} fps, read at {args.fps} frames/s")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows, total = [], 0.0
        for i in range(args.clips):
            text = " and ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(2))  # about 4 s of speech
            total += make_clip(folder / f"c{i}.mp4", text, 20 + 60 * (i % 2), fps=args.source_fps, size=(w, h),
                               seed=i)
            rows.append(f'{{"id": "c{i}", "video": "c{i}.mp4", "text": "x", "label": "a"}}\n')
        (folder / "clips.jsonl").write_text("".join(rows))
        print(f"{total:.0f} s of video in all\n")

        vision = {"name": "face", "fps": args.fps}
        settings = [
            ("audio: openSMILE eGeMAPS", ExtractionConfig(vision=None)),
            ("vision: faces only", ExtractionConfig(audio=None, vision={**vision, "embed": "none"})),
            ("vision: faces + EfficientNet-Lite0", ExtractionConfig(audio=None, vision=vision)),
            ("  the same, embedded at 224 px", ExtractionConfig(audio=None, vision={**vision, "embed_size": 224})),
            ("audio + vision (the default)", ExtractionConfig(vision=vision)),
        ]
        print(f"{'extractors':<36}" + "".join(f"{f'{n} worker(s)':>16}{'steady':>10}" for n in args.workers))
        for label, cfg in settings:
            line = f"{label:<36}"
            for n in args.workers:
                s = extract_features(folder / "clips.jsonl", folder / f"out-{label[:5]}-{n}-{time.time()}", cfg,
                                     workers=n)
                line += f"{s.video_seconds / s.wall_seconds:>15.1f}x{s.video_seconds / (s.clip_seconds / n):>9.1f}x"
            print(line, flush=True)

        # Where one worker's time goes, per second of video (one process, one thread).
        ex = Extraction(ExtractionConfig(vision=vision))
        audio, face = ex.extractors["audio"], ex.extractors["vision"]
        parts = dict.fromkeys(["decode audio", "openSMILE", "decode frames", "face cascades", "embedding"], 0.0)
        face._embed([np.zeros((64, 64, 3), np.uint8)])  # first-call costs outside the timing
        for i in range(args.clips):
            path = folder / f"c{i}.mp4"
            t0 = time.perf_counter()
            pcm = read_audio(path, 16000, 600)
            t1 = time.perf_counter()
            audio._smile.process_signal(pcm, 16000)
            t2 = time.perf_counter()
            frames = list(iter_frames(path, args.fps, 640, 600))
            t3 = time.perf_counter()
            found = None
            for _, f in frames:  # as the extractor does: each frame looks near the last one's face first
                _, _, found = face._face(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), found)
            t4 = time.perf_counter()
            face._embed([f for _, f in frames])
            t5 = time.perf_counter()
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                parts[k] += v
        busy = sum(parts.values())
        print(f"\none worker, per second of video ({busy / total * 1000:.0f} ms in all: "
              f"{total / busy:.1f}x real time on one core):")
        for k, v in parts.items():
            print(f"  {k:<16}{v / total * 1000:>8.1f} ms  {v / busy:>6.1%}")


if __name__ == "__main__":
    main()
