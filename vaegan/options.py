"""Every `auto` option turned into a value, with the reason for it, and every check across options.

`resolve(cfg, device, world_size, dataset)` is the one place a run's choices are made: the data's
presets, the precision, the attributes a conditional model takes, the kernels, whether the step is
compiled and captured in CUDA graphs, the memory format, the optimizers' implementation, the loader and
the decoded-data cache. What it returns holds no `auto`: config.json writes it, the run's facts apart
from the machine's choices (config.MACHINE_CHOICES), which a resumed run makes again.
`CHECKS` is the table of option combinations (and of options with the machine and the data) that
cannot run; `check` applies it, before anything is built (the rows that need no machine) and again
on the resolved values. A choice asked for by name that this machine or data cannot provide (CUDA,
Triton, DALI, the data's attributes) is refused where it is resolved, with the reason. Two choices
are confirmed only when built (trainer.setup): a default compile that fails runs eager, and a DALI
pipeline that `auto` chose but cannot be built gives way to PIL; both say so on the start lines.
"""
from collections import namedtuple
from dataclasses import replace

import torch

from .config import ConfigError, default_workers, run_facts
from .models import CONDITIONAL_KINDS, base_kind

# The `auto` values decided at a run's start and kept for its life (they decide its results): a resumed
# run takes them from its checkpoint. The machine's choices (config.MACHINE_CHOICES) are decided again
# on each start, for the machine it runs on.
RUN_DECISIONS = ("precision", "attributes", "kernels")

# The one statement of why apex is refused (--help and optimizers.masked_step point here).
APEX_REFUSED = ("--optimizer-impl apex is refused: NVIDIA apex's FusedAdam counts its steps in param_group['step'], "
                "a host integer that a skipped step (every step here may be skipped, by the equilibrium rule or the "
                "non-finite guard, decided on the device) cannot restore without waiting for the device, so skips "
                "would advance its bias correction; torch's fused Adam (--optimizer-impl fused) keeps its step with "
                "its state and is skipped exactly")

# What the checks need to know of where the run happens; None before the device and data are known.
Machine = namedtuple("Machine", "device_type world_size data_in_memory")


def _device_name_ok(name):
    return name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())


# (needs the machine, when the options cannot run, what the user is told)
CHECKS = (
    (False, lambda c, m: c.workers is not None and c.workers < 0,
     lambda c, m: f"--workers takes 0 or more, not {c.workers}"),
    (False, lambda c, m: not _device_name_ok(c.device),
     lambda c, m: f"--device takes auto, cpu, cuda or cuda:N, not {c.device!r}"),
    (False, lambda c, m: c.dis_sees_recon and c.model not in ("vaegan", "cvaegan"),
     lambda c, m: f"--dis-sees-recon applies to --model vaegan or cvaegan only, not {c.model}"),
    (False, lambda c, m: c.attributes is not None and c.model not in CONDITIONAL_KINDS,
     lambda c, m: f"--attributes applies to the conditional models ({', '.join(CONDITIONAL_KINDS)}), not {c.model}"),
    (False, lambda c, m: c.kernels == "triton" and c.gan_loss_form == "eps",
     lambda c, m: "--gan-loss-form eps has no fused kernel: use --kernels torch, or --gan-loss-form logits"),
    (True, lambda c, m: c.optimizer_impl == "fused" and c.optimizer == "rmsprop" and _triton_unavailable(m),
     lambda c, m: f"--optimizer-impl fused with rmsprop runs our Triton kernel: {_triton_unavailable(m)}; "
                  "use foreach (the default)"),
    (False, lambda c, m: c.optimizer_impl == "fused" and c.optimizer == "rmsprop" and c.precision == "fp64",
     lambda c, m: "--optimizer-impl fused with rmsprop updates float32 parameters, and --precision fp64 keeps "
                  "float64 ones: use foreach (the default)"),
    (False, lambda c, m: c.optimizer_impl == "apex", lambda c, m: APEX_REFUSED),
    (True, lambda c, m: c.fuse_bn_relu and _triton_unavailable(m),
     lambda c, m: f"--fuse-bn-relu runs our Triton convolution: {_triton_unavailable(m)}; drop --fuse-bn-relu"),
    (False, lambda c, m: c.fuse_bn_relu and c.precision == "fp64",
     lambda c, m: "--fuse-bn-relu computes in float32, bf16 or fp16, not --precision fp64: drop one of them"),
    (False, lambda c, m: c.fuse_bn_relu and c.sync_bn,
     lambda c, m: "--fuse-bn-relu normalises with each process's batch statistics, and --sync-bn takes them across "
                  "processes: drop one of them"),
    (True, lambda c, m: c.cuda_graphs and m.device_type != "cuda",
     lambda c, m: "--cuda-graphs needs CUDA; this run is on the CPU"),
    (False, lambda c, m: c.cuda_graphs and c.compile is False,
     lambda c, m: "--cuda-graphs captures the compiled step: drop --no-compile"),
    (True, lambda c, m: c.cuda_graphs and c.sync_bn and m.world_size > 1,
     lambda c, m: "--cuda-graphs with --sync-bn across processes would capture NCCL all-reduces in a CUDA graph, "
                  "which is not supported here: drop one of them (--compile alone works with --sync-bn)"),
    (False, lambda c, m: c.max_autotune and (c.compile is False or c.compile_backend != "inductor"),
     lambda c, m: "--max-autotune tunes inductor's kernels: it needs --compile with --compile-backend inductor"),
    (False, lambda c, m: c.decoder_call == "joint" and base_kind(c.model) != "vaegan",
     lambda c, m: f"--decoder-call joint applies to models whose decoder runs twice with gradients "
                  f"(vaegan, cvaegan), not {c.model}"),
    (False, lambda c, m: c.decoder_call == "joint" and c.sync_bn,
     lambda c, m: "--decoder-call joint normalises each half of its call with that half's own statistics, and "
                  "--sync-bn takes statistics across processes: drop one of them"),
    (True, lambda c, m: c.compile and c.kernels == "triton" and m.device_type != "cuda",
     lambda c, m: "--compile with --kernels triton needs CUDA (Triton's interpreter cannot be compiled); "
                  "use --kernels torch on the CPU"),
    (True, lambda c, m: c.loader == "dali" and m.data_in_memory,
     lambda c, m: "--loader dali: the built-in faces are held in memory; use --loader pil"),
    (True, lambda c, m: c.data_cache == "gpu" and m.device_type != "cuda",
     lambda c, m: "--data-cache gpu needs CUDA; this run is on the CPU (--data-cache host holds the images in "
                  "host memory)"),
    (False, lambda c, m: c.data_cache in ("gpu", "host") and c.loader == "dali",
     lambda c, m: f"--data-cache {c.data_cache} decodes the images once with PIL and --loader dali decodes each "
                  "batch: drop one of them"),
    (True, lambda c, m: c.augment == "authors" and m.data_in_memory,
     lambda c, m: "--augment authors augments image files before the crop; the built-in faces are held in memory, "
                  "already cropped and resized: use --augment flip, or pass --data DIR"),
)


def _triton_unavailable(machine):
    """None if our Triton kernels (the fused RMSprop's, --fuse-bn-relu's) can run on the machine's device here,
    else why not."""
    import kernels
    return kernels.triton_unavailable_reason(machine.device_type)


def check(cfg, machine=None):
    """Raise ConfigError for the first row of CHECKS that `cfg` meets (without a machine: the rows that need none)."""
    for needs_machine, broken, message in CHECKS:
        if (machine is not None or not needs_machine) and broken(cfg, machine):
            raise ConfigError(message(cfg, machine))


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")
    return device


def cpu_has_native_bf16():
    """bf16 instructions (AVX512-BF16 or AMX): without them a CPU emulates bf16, slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(device):
    """--precision auto -> (precision, why): bf16 autocast on CUDA devices with bf16 (Ampere and
    later) and on CPUs with bf16 instructions (the built-in demo's step ran 1.7x fp32 on one:
    bench/results/cpu-20261202-formats.txt), fp32 elsewhere."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this CUDA device has bf16"
        return "fp32", "auto: this CUDA device has no bf16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16", "auto: this CPU has bf16 instructions"
    return "fp32", "auto: no bf16 instructions on this CPU (bf16 would be emulated, slower than fp32)"


def resolve_kernels(choice, device, gan_loss_form="logits", kept=False):
    """("torch" | "triton", how it was chosen). Before a run relies on the fused kernels they are
    checked against the references on `device` (kernels/selfcheck.py): --kernels auto falls back to
    the references, saying why; --kernels triton that cannot run or disagrees is an error. kept: the
    choice is a resumed run's, from its checkpoint."""
    import kernels
    if choice == "torch":
        return "torch", "kept from the run's start" if kept else "requested"
    if choice == "auto" and gan_loss_form == "eps":
        return "torch", "default for --gan-loss-form eps, which has no fused kernel"
    if choice == "auto" and device.type != "cuda":
        return "torch", "default off CUDA"
    reason = kernels.triton_unavailable_reason(device.type)
    if reason is None:
        from kernels.selfcheck import self_check
        reason = self_check(device)
    if choice == "triton":
        if reason and kept:
            raise ConfigError(f"the resumed run computes its losses with the Triton kernels, which cannot run here: "
                              f"{reason}; pass --kernels torch to continue with the reference losses")
        if reason:
            raise ConfigError(f"--kernels triton: {reason}")
        how = "kept from the run's start" if kept else "interpreter" if device.type != "cuda" else "requested"
        return "triton", f"{how}, checked against the references"
    if reason:
        return "torch", f"default, as {reason}"
    return "triton", "default on CUDA, checked against the references"


def resolve_optimizer_impl(choice, optimizer, device_type):
    """("for-loop" | "foreach" | "fused", why); what cannot run is refused by CHECKS."""
    if choice == "auto":
        if optimizer == "adam" and device_type == "cuda":
            return "fused", "default for adam on CUDA"
        return "foreach", "default" + (" (the fused masked RMSprop kernel is chosen with --optimizer-impl fused: "
                                       "not yet measured on a GPU)" if optimizer == "rmsprop" else "")
    return choice, "requested"


def resolve_loader(choice, device, in_memory):
    """("pil" | "dali", a description with a {workers} field): --loader dali that cannot run is an error."""
    from .data.dali import dali_unavailable_reason
    if choice == "pil" or (choice == "auto" and (device.type != "cuda" or in_memory)):
        return "pil", f"{'requested' if choice == 'pil' else 'default'}, {{workers}} workers"
    reason = "the built-in faces are held in memory" if in_memory else dali_unavailable_reason()
    if reason:
        if choice == "dali":
            raise ConfigError(f"--loader dali: {reason}")
        return "pil", f"default, as {reason}; {{workers}} workers"
    return "dali", "GPU decoding" if device.type == "cuda" else "CPU operators"


def resolve_data_cache(choice, device, dataset, augment, loader):
    """("gpu" | "host" | "none", why), by vaegan/data/cache.py's shares of the free memory; an explicit
    gpu or host that cannot hold the decoded images at all is an error giving the sizes."""
    from .data import cache
    if dataset is None:
        return "none", "no image files"
    if dataset.in_memory:
        return "none", ("the built-in faces are held in memory already" if choice in ("auto", "none")
                        else f"--data-cache {choice} requested, but the built-in faces are held in memory already")
    if choice == "none":
        return "none", "requested"
    if choice == "auto" and loader != "auto":
        return "none", f"default with --loader {loader}"
    if choice == "auto" and device.type != "cuda":
        return "none", ("default on CPUs: DataLoader workers decode and preprocess each batch, in parallel with "
                        "the step")
    needed = cache.decoded_bytes(dataset, augment)
    height, width, channels = dataset.decoded_shape(augment)
    size = f"{len(dataset)} images of {height}x{width}x{channels} take {cache.gigabytes(needed)}"
    gpu_free = cache.free_device_bytes(device) if device.type == "cuda" else 0
    host = cache.available_host_bytes()
    gpu_text = f"{cache.gigabytes(gpu_free)} free on the GPU"
    host_text = (f"{cache.gigabytes(host)} available in host memory" if host is not None
                 else "host memory unknown (no /proc/meminfo)")
    if choice == "gpu":
        if needed > gpu_free:
            raise ConfigError(f"--data-cache gpu: {size}, more than the {gpu_text}; use --data-cache host or none")
        return "gpu", f"requested: {size} of {gpu_text}"
    if choice == "host":
        if host is not None and needed > host:
            raise ConfigError(f"--data-cache host: {size}, more than the {host_text}; use --data-cache none")
        return "host", f"requested: {size} of {host_text}"
    if needed <= cache.GPU_SHARE * gpu_free:
        return "gpu", f"auto: {size}, at most {cache.GPU_SHARE:.0%} of the {gpu_text}"
    if host is not None and needed <= cache.HOST_SHARE * host:
        return "host", f"auto: {size}, more than {cache.GPU_SHARE:.0%} of the {gpu_text}; at most " \
                       f"{cache.HOST_SHARE:.0%} of the {host_text}"
    return "none", f"auto: {size}, more than {cache.GPU_SHARE:.0%} of the {gpu_text} and than " \
                   f"{cache.HOST_SHARE:.0%} of the {host_text}"


def resolve_workers(choice, in_memory):
    """(DataLoader workers, why): the CPU cores this process may use for image files, none for data in memory."""
    if choice is not None:
        return choice, "requested"
    if in_memory:
        return 0, "default: the built-in faces are held in memory and batched in the main process"
    return default_workers(), "default: the CPU cores this process may use, shared by the processes on the node"


def resolve_compile(cfg, device_type, world_size):
    """(compile, cuda_graphs, why): --compile and --cuda-graphs as given, else on with CUDA; CUDA graphs
    not with --sync-bn across processes (their NCCL all-reduces cannot be captured)."""
    compile_step = cfg.compile if cfg.compile is not None else device_type == "cuda"
    graphs_possible = compile_step and device_type == "cuda" and not (cfg.sync_bn and world_size > 1)
    cuda_graphs = cfg.cuda_graphs if cfg.cuda_graphs is not None else graphs_possible
    if cfg.compile is not None:
        why = "requested"
    elif device_type == "cuda":
        why = "default with CUDA; eager if compiling fails"
    else:
        why = "default on CPUs: eager (compiling takes longer than a short CPU run)"
    return compile_step, cuda_graphs, why


def resolve_attributes(cfg, dataset):
    """(the attribute names a conditional model conditions on, why), or (None, why) for the others."""
    if cfg.model not in CONDITIONAL_KINDS:
        return None, "unconditional model"
    if dataset is None or not dataset.attribute_names:
        name = dataset.name if dataset is not None else "the data"
        raise ConfigError(f"--model {cfg.model} conditions on attributes, and {name} has none "
                          "(CelebA's list_attr_celeba.txt, or one in its format beside a folder's images)")
    names = cfg.attributes.split(",") if cfg.attributes else list(dataset.attribute_names)
    unknown = [n for n in names if n not in dataset.attribute_names]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(f"--attributes {cfg.attributes}: " + (f"{', '.join(unknown)} not in the data's attribute "
                          f"file (it has {', '.join(dataset.attribute_names)})" if unknown else "a name is repeated"))
    return ",".join(names), "requested" if cfg.attributes else "default: every attribute the data has"


def resolve(cfg, device, world_size=1, dataset=None, kept=()):
    """(cfg with every `auto` and data default decided, {option: why it has its value}).

    device: the torch.device the run uses (resolve_device's, with the process's index); dataset:
    the training data (its attribute names and whether it is held in memory), or None for a
    benchmark's generated batches; kept: the names of RUN_DECISIONS a resumed run took from its checkpoint."""
    cfg = cfg.resolved()
    check(cfg)
    reasons = {"device": "requested" if cfg.device != "auto" else "auto: "
               + ("CUDA is available" if device.type == "cuda" else "no CUDA device")}
    values = {"device": str(device)}
    if cfg.precision == "auto":
        values["precision"], reasons["precision"] = resolve_precision(device)
    else:
        reasons["precision"] = "kept from the run's start" if "precision" in kept else "requested"
    values["attributes"], reasons["attributes"] = resolve_attributes(cfg, dataset)
    if "attributes" in kept and values["attributes"] is not None:
        reasons["attributes"] = "kept from the run's start"
    values["kernels"], reasons["kernels"] = resolve_kernels(cfg.kernels, device, cfg.gan_loss_form,
                                                            "kernels" in kept)
    values["compile"], values["cuda_graphs"], reasons["compile"] = resolve_compile(cfg, device.type, world_size)
    values["memory_format"] = "channels-last" if cfg.memory_format == "auto" else cfg.memory_format
    reasons["memory_format"] = "default" if cfg.memory_format == "auto" else "requested"
    in_memory = bool(dataset is not None and dataset.in_memory)
    values["workers"], reasons["workers"] = resolve_workers(cfg.workers, in_memory)
    values["optimizer_impl"], reasons["optimizer_impl"] = resolve_optimizer_impl(cfg.optimizer_impl, cfg.optimizer,
                                                                                 device.type)
    check(cfg, Machine(device.type, world_size, in_memory))  # before the loader's choice: --augment authors on faces
    if values["optimizer_impl"] == "fused" and cfg.optimizer == "rmsprop":
        from kernels.selfcheck import rmsprop_self_check
        failure = rmsprop_self_check(device)
        if failure:
            raise ConfigError(f"--optimizer-impl fused: {failure}; use foreach (the default)")
        reasons["optimizer_impl"] = "requested, checked against the reference"
    values["data_cache"], reasons["data_cache"] = resolve_data_cache(cfg.data_cache, device, dataset,
                                                                     cfg.augment == "authors", cfg.loader)
    if values["data_cache"] != "none":
        values["loader"], reasons["loader"] = "pil", (("requested" if cfg.loader == "pil" else "default")
                                                        + ", decoding once into the cache with {workers} thread(s)")
    else:
        values["loader"], reasons["loader"] = resolve_loader(cfg.loader, device, in_memory)
    resolved = replace(cfg, **values)
    check(resolved, Machine(device.type, world_size, in_memory))
    return resolved, reasons


def kept_for_resume(resolved):
    """What the checkpoint keeps: the run's facts (its own decisions, RUN_DECISIONS, included); none of the
    machine's choices, which are made again where the run resumes."""
    return run_facts(resolved)
