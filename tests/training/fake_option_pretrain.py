"""``pretrain_glm.py`` with the fake option of ``tests/model/fake_option.py`` installed (every rank runs this)."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.model.fake_option import install  # noqa: E402

install()
sys.argv = [str(ROOT / "pretrain_glm.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "pretrain_glm.py"), run_name="__main__")
