"""Calibration text: files, a folder of .txt files, or a `datasets` name (Hub)."""

from pathlib import Path


def load_calib_texts(spec: str) -> list[str]:
    """Texts from a file path, a folder (all *.txt, sorted), or 'datasets:NAME[:CONFIG][:SPLIT]'."""
    if spec.startswith("datasets:"):
        parts = spec.split(":")[1:]
        name, config, split = (parts + [None, None])[:3]
        try:
            import datasets
        except ImportError:
            raise ValueError("calibration from a datasets name needs `pip install datasets`") from None
        ds = datasets.load_dataset(name, config, split=split or "train")
        column = "text" if "text" in ds.column_names else ds.column_names[0]
        return [t for t in ds[column] if t and t.strip()]
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"calibration folder {path} holds no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"calibration text {spec} not found (give a file, a folder, or datasets:NAME)")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]
