"""`tide-ds bench floor`: its matmul floor runs the real step's matrix products, no more, no fewer."""

import argparse

import pytest
from torch.utils.flop_counter import FlopCounterMode

from tide_ds.bench import floor


@pytest.mark.parametrize("recipe", floor.RECIPES)
def test_the_matmul_floor_has_the_real_steps_matrix_products(recipe):
    p = argparse.ArgumentParser()
    floor.add_arguments(p)
    sizes = ["--vocab", "3000", "--length", "64", "--hidden", "128", "--teacher-hidden", "64"]
    args = p.parse_args(["--worker", recipe, *sizes, "--layers", "2", "--teacher-layers", "3", "--block-size", "8"])
    bench = floor.build_bench(args)
    bench.real_step()  # the rows the loss reads
    with FlopCounterMode(display=False) as real:
        bench.real_step()
    call = floor.matmul_floor(recipe, bench.shapes)
    with FlopCounterMode(display=False) as products:
        call()
    assert bench.shapes["rows"] > 0 and (bench.shapes["teacher_rows"] > 0) == (recipe != "ce")
    assert products.get_flop_counts()["Global"] == real.get_flop_counts()["Global"], bench.shapes
