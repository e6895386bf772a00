"""Where a finished run loses its accuracy, layer by layer (``abc-sensitivity RUN_DIR``).

    from abc_experiments.sensitivity import layer_sensitivity, write_outputs
    result = layer_sensitivity("outputs/runs/<run>")     # one LayerSensitivity per converted layer
    write_outputs(result, "outputs/runs/<run>/sensitivity")
"""

from .measure import LayerSensitivity, Sensitivity, layer_sensitivity, load_fp_model, output_errors
from .report import markdown_table, plot, write_outputs

__all__ = ["LayerSensitivity", "Sensitivity", "layer_sensitivity", "load_fp_model", "markdown_table",
           "output_errors", "plot", "write_outputs"]
