"""Local ``evaluate`` modules; ``MODULE_PATH`` is the file to pass to ``evaluate.load``."""

from pathlib import Path

MODULE_PATH: str = str(Path(__file__).with_name("hilt_report_metrics.py"))
