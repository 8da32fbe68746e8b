"""Progress bars: one tqdm bar style for every long loop (conversion, training).

    for row in progress_bar(rows, desc="reading tensors", unit="tensor", disable=not progress): ...
    bar = progress_bar(total=num_layers, desc="reading x.gguf", unit="layer"); bar.update(1); bar.close()

The bar shows done/total, the rate (units/s) and the time left, on stderr, sized to the terminal; with
disable=True it draws nothing and iterating it yields the items unchanged.
"""

from __future__ import annotations

from typing import Iterable


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
                 unit: str = "it", initial: int = 0, disable: bool = False, leave: bool = False):
  """A `tqdm` bar over `iterable` (or a manual one of `total` units, advanced by `.update(n)`).

  initial: units already done (a resumed run); leave: keep the finished bar on screen (default: erase it).
  """
  from tqdm.auto import tqdm
  return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave,
              dynamic_ncols=True)
