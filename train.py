"""Train a minillm model: ``python train.py [group=option ...] [key=value ...]``.

Hydra composes conf/train.yaml; its output directory is the run directory.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from minillm.training.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    summary = train(OmegaConf.to_container(cfg, resolve=True), HydraConfig.get().runtime.output_dir)
    return summary["val_ppl"]  # the value a Hydra sweeper would minimise


if __name__ == "__main__":
    main()
