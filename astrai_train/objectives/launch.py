"""Make the Trainer match the world a launcher made, or say exactly what to change.

Four ways to start the same train.py:
  fabric run / lightning run model  -> sets LT_* (accelerator, strategy, devices, num_nodes,
                                       precision), then starts the processes through torchrun
  torchrun --nproc-per-node=N       -> sets WORLD_SIZE, LOCAL_WORLD_SIZE, TORCHELASTIC_RUN_ID
  python train.py --devices N       -> no launcher: Lightning starts the other N-1 processes itself
The recipe may leave devices/num_nodes/strategy/precision unset (None) to follow the launcher;
a value that contradicts the launcher is an error, because Lightning would otherwise hang waiting
for ranks that were never started or silently train on a different world than the one asked for.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from astrai_train.objectives.config import RecipeError, TrainerSection


def device_count(devices: int | str | None) -> int | None:
    """How many processes per node a `devices` value means; None when it cannot be known here."""
    if devices is None:
        return None
    if isinstance(devices, int):
        return devices
    text = devices.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if "," in text:  # "0,1": a list of device indices
        return len([d for d in text.split(",") if d.strip()])
    return None  # "auto"


def _fabric_values(env: Mapping[str, str]) -> dict[str, str]:
    names = {"accelerator": "LT_ACCELERATOR", "strategy": "LT_STRATEGY", "devices": "LT_DEVICES",
             "num_nodes": "LT_NUM_NODES", "precision": "LT_PRECISION"}
    return {field: env[var] for field, var in names.items() if env.get(var)}


def resolve_world(t: TrainerSection, env: Mapping[str, str], cuda_available: bool) -> TrainerSection:
    """Fill the launcher-dependent fields of `t` from `env`, checking they agree with the recipe."""
    values = {f: getattr(t, f) for f in ("accelerator", "strategy", "devices", "num_nodes", "precision")}
    if env.get("LT_CLI_USED") == "1":
        for field_name, launched in _fabric_values(env).items():
            mine = values[field_name]
            if mine in (None, "auto"):
                values[field_name] = launched
            elif str(mine) != launched and not (field_name in ("devices", "num_nodes")
                                                and device_count(mine) == device_count(launched)):
                flag = "--" + field_name.replace("_", "-")
                raise RecipeError(
                    f"the launcher (fabric run / lightning run model) was given {flag}={launched} but the recipe "
                    f"sets trainer.{field_name}={mine!r}; drop trainer.{field_name} from the recipe and command "
                    f"line (it follows the launcher) or launch with {flag}={mine}")
    if env.get("TORCHELASTIC_RUN_ID") is not None and "LOCAL_WORLD_SIZE" in env:
        world, local = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        wanted = device_count(values["devices"])
        if values["devices"] in (None, "auto"):
            values["devices"] = local
        elif wanted != local:
            raise RecipeError(
                f"the launcher started {local} processes per node (--nproc-per-node / --devices={local}) but "
                f"the Trainer is asked for devices={values['devices']!r}; pass --devices={local} to train.py, "
                f"drop trainer.devices, or launch {wanted} processes per node")
        nodes = world // local
        if values["num_nodes"] is None:
            values["num_nodes"] = nodes
        elif int(values["num_nodes"]) * local != world:
            raise RecipeError(
                f"the launcher made a world of {world} processes ({local} per node x {nodes} nodes) but the "
                f"Trainer is asked for num_nodes={values['num_nodes']}; devices x num_nodes must equal the "
                f"world size: pass --num-nodes={nodes} or drop trainer.num_nodes")
    if values["devices"] is None:
        values["devices"] = 1
    if values["num_nodes"] is None:
        values["num_nodes"] = 1
    if isinstance(values["devices"], str) and values["devices"].strip().lstrip("-").isdigit():
        values["devices"] = int(values["devices"])  # "2" from LT_DEVICES means two processes, not GPU index 2
    values["num_nodes"] = int(values["num_nodes"])
    processes = (device_count(values["devices"]) or 1) * values["num_nodes"]
    if values["strategy"] in (None, "auto"):
        values["strategy"] = "ddp" if processes > 1 else "auto"
    if values["precision"] is None:
        on_gpu = cuda_available and values["accelerator"] in ("auto", "gpu", "cuda")
        values["precision"] = "bf16-mixed" if on_gpu else "32-true"
    return dataclasses.replace(t, **values)
