"""Random numbers on the emulated device: its generator is the CPU generator."""

from __future__ import annotations

import torch

from maca_infer.common.device.emulation.devices import _st

# The device's generator is the CPU generator: tensors live there. Go to
# torch.default_generator directly: torch.manual_seed itself calls
# torch.cuda.manual_seed_all.
def manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def seed() -> None:
    torch.default_generator.seed()


def initial_seed() -> int:
    return torch.default_generator.initial_seed()


def get_rng_state(device="cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def set_rng_state(new_state: torch.Tensor, device="cuda") -> None:
    torch.default_generator.set_state(new_state)


def get_rng_state_all() -> list[torch.Tensor]:
    return [torch.default_generator.get_state() for _ in range(_st().device_count)]


def set_rng_state_all(new_states) -> None:
    for state in new_states:
        torch.default_generator.set_state(state)
