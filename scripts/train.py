"""Train a policy; the method is ``data_source`` x ``signal`` (see conf/train.yaml).

    python scripts/train.py experiment=sft
    python scripts/train.py data_source=on_policy signal=dense
    python scripts/train.py -m data_source=off_policy,on_policy signal=sparse,dense
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from lightning_unified.config import CONFIG_DIR, quiet_console, train
from lightning_unified.errors import report_named_errors


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    quiet_console()
    output_dir = HydraConfig.get().runtime.output_dir
    with report_named_errors():  # a config or data error: its one message, no traceback
        metrics = train(cfg, output_dir)
    if rank_zero_only.rank != 0:
        return metrics.get("val/exact_match", 0.0)
    print(f"run directory: {output_dir}")
    print(f"  metrics:     {output_dir}/metrics.csv")
    print(f"  checkpoints: {output_dir}/checkpoints")
    if cfg.get("save_policy"):
        print(f"  policy:      {output_dir}/{cfg.save_policy} (Hugging Face format)")
    if cfg.get("export_every"):
        print(f"  exports:     {output_dir}/exports (Hugging Face format, every {cfg.export_every} steps)")
    for name, value in metrics.items():
        print(f"  {name} = {value:.4f}")
    return metrics.get("val/exact_match", 0.0)


if __name__ == "__main__":
    main()
