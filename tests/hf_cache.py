"""A Hugging Face hub cache made by hand: what `pdserve serve ORG/NAME` reads without a network."""
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_with(model_dir: Path, cache: Path, model_id: str) -> Path:
    """A cache under `cache` holding `model_dir`'s files as `model_id`'s main revision; its snapshot."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot
