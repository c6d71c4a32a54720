"""Run by test_ddp.py under torchrun: train a config, then write this rank's weights."""

import os
import sys
from pathlib import Path

import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import helpers  # noqa: E402

from difflineage.systems import config_from_dict
from difflineage.train import Trainer  # noqa: E402

helpers.register()
cfg = config_from_dict(yaml.safe_load(Path(sys.argv[1]).read_text()))
out = Path(sys.argv[2])
trainer = Trainer(cfg, out / "run", progress=False)
trainer.fit()
rank = int(os.environ["RANK"])
save_file({k: v.contiguous() for k, v in trainer.system.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
