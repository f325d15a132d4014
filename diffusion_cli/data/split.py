"""How many images a data set holds out for the eval loss: data.num_eval, or `auto`."""

import logging

from ..errors import UserError

log = logging.getLogger(__name__)

AUTO_MAX = 256      # data.num_eval=auto holds out 10% of the images, at most this many
MEMORISES = 20      # a folder this small is learned by heart: said once, then trained


def held_out_count(data_cfg, count: int, what: str = "images") -> int:
    """data.num_eval as a count of the `count` images it draws from. auto: 10% of them, between 1
    and AUTO_MAX, never all (a single image holds none out: its eval loss reads the image itself)."""
    if data_cfg.num_eval != "auto":
        return data_cfg.num_eval
    held = min(AUTO_MAX, max(1, count // 10)) if count > 1 else 0
    log.info(f"data.num_eval=auto: {held:,} of {count:,} {what} held out for the eval loss" if held else
             "data.num_eval=auto: a single image, none held out: the eval loss reads the training image")
    return held


def check_held_out(data_cfg, held: int, count: int, what: str = "readable images") -> None:
    """One line when a folder's num_eval would leave nothing to train on."""
    if held >= count:
        raise UserError(f"data.path={data_cfg.path} has {count} {what} and data.num_eval={held} would "
                        f"hold out all of them: lower data.num_eval (or leave it at auto)")
