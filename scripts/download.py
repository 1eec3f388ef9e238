#!/usr/bin/env python3
"""Download official GPT-2 checkpoints into weights/<name>/ (config.json, model.safetensors, vocab.json,
merges.txt only; the hub repos also hold five other weight formats of the same size).

    python scripts/download.py gpt2
    python scripts/download.py gpt2 gpt2-medium --weights-dir /data/gpt2 --revision <commit>
    python scripts/download.py all

The weights folder defaults to $GPT2NP_WEIGHTS, else ./weights; the revision to $GPT2NP_REVISION,
else the repository's main branch. A checkpoint already complete on disk is not downloaded again.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpt2np.config import SIZES  # noqa: E402
from gpt2np.weights import canonical_name, download, missing_files, weights_dir  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", metavar="NAME",
                    help=f"{', '.join(SIZES)} (or openai-community/<name>), or 'all'")
    ap.add_argument("--weights-dir", type=Path, help="folder for the checkpoints (default $GPT2NP_WEIGHTS or ./weights)")
    ap.add_argument("--revision", help="a commit hash or branch of the hub repository (default $GPT2NP_REVISION or main)")
    ap.add_argument("--force", action="store_true", help="download even when the files are already there")
    a = ap.parse_args(argv)

    names = list(SIZES) if a.names == ["all"] else a.names
    unknown = [n for n in names if canonical_name(n) is None]
    if unknown:
        ap.error(f"unknown model name {', '.join(map(repr, unknown))}: choose from {', '.join(SIZES)} or 'all'")
    for name in dict.fromkeys(canonical_name(n) for n in names):
        folder = weights_dir(a.weights_dir) / name
        if not a.force and not missing_files(folder):
            print(f"{name}: already complete in {folder}")
            continue
        print(f"{name}: downloading into {folder}")
        try:
            download(name, root=a.weights_dir, revision=a.revision)
        except ConnectionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{name}: done ({folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
