"""Memory of a causal LM by storage format and of one QLoRA training step: analytic and measured (notebook 02).

- ``analytic``: parameter counts per tensor kind, exact bytes per storage format, one training step's bytes;
- ``tensors``: what a loaded model's tensors hold (4-bit unpacked, bitsandbytes' constants);
- ``process``: the resident memory of a CPU process;
- ``loading``: configs, shapes-only models, each format as the measurements load it, the quantised CPU cache;
- ``quality``: completion loss and quantisation error;
- ``live``: what runs here when the profile's weights are missing;
- ``measure`` / ``tasks``: each measurement in a fresh ``python -m utils.memory child`` process;
- ``tables``: the notebook's tables and the committed GPU report;
- ``gpu_report``: ``python -m utils.memory gpu-report`` (the twin measured on a GPU);
- ``budget``: ``cap_gpu_memory`` (what an 8 GB card leaves, imposed on a bigger GPU) and ``peak_gpu_memory``.

Figures are in ``utils.plotting.memory``, the findings' prose in ``utils.reports.memory``.
"""

from utils.memory.analytic import (
    ATTENTION_MODULES,
    DTYPE_BYTES,
    FORMATS,
    LINEAR_MODULES,
    MLP_MODULES,
    QUANTIZED,
    TENSOR_KINDS,
    TRAIN_VARIANTS,
    analytic_parameter_counts,
    analytic_training_breakdown,
    analytic_weight_bytes,
    config_dict,
    four_bit_constant_bytes,
    head_dim,
    linear_shapes,
    lora_tensor_shapes,
    module_kind,
    optimizer_state_bytes,
)
from utils.memory.budget import (
    CAP_ENV,
    WINDOWS_DISPLAY_RESERVE_GIB,
    apply_gpu_memory_cap_from_env,
    cap_gpu_memory,
    peak_gpu_memory,
)
from utils.memory.gpu_report import GPU_TRAIN_CONFIGS, GPU_WEIGHT_FORMATS, TWIN_LABEL, gpu_report
from utils.memory.live import DEFAULT_GPU_RESULTS, FALLBACK_PLANS, LiveModel, has_twin_architecture, resolve_live_model
from utils.memory.loading import (
    cache_is_fresh,
    load_for_measurement,
    load_model_config,
    load_quantized_cached,
    meta_model,
    quantized_cache_folder,
    reference_model,
    supported_formats,
)
from utils.memory.measure import (
    MeasurementError,
    measure_formats,
    measure_quantization_errors,
    measure_training_steps,
    run_child,
)
from utils.memory.process import peak_rss_bytes, release_free_memory, reset_peak_rss, rss_bytes, touch_parameters
from utils.memory.quality import completion_loss, linear_weights, quantization_errors
from utils.memory.tables import (
    BREAKDOWN_LABELS,
    FORMAT_LABELS,
    KIND_LABELS,
    analytic_weight_table,
    load_gpu_report,
    parameter_count_table,
    quality_table,
    report_metadata,
    side_by_side,
    training_breakdown_table,
    training_table,
    weights_table,
)
from utils.memory.tensors import measured_parameter_counts, quant_state_bytes, tensor_kind, unpacked_numel
