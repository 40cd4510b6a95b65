"""The engine's two helper graphs, committed beside this module, and how they are built.

* `app/inference/reorder.onnx` gathers h and c by parent row, so beam state is reordered where it lives
  (with IO binding, h and c never leave the device).
* `app/inference/select.onnx` runs TopK over the step's log-probabilities (values and token ids, sorted, ties to
  the lower id) and gathers the <end> column, so only [rows, k] reaches the host (StepOutput).

The builders need the `onnx` package (the training extra), which the service never imports; they run
when the graphs are regenerated (`python -m app.inference.graphs`) and in tests/test_engine_binding.py,
which checks that the committed files are exactly what they build.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import onnx

REORDER_GRAPH = Path(__file__).with_name("reorder.onnx")
SELECT_GRAPH = Path(__file__).with_name("select.onnx")
OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime the project supports


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="captioner")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def build_reorder_model() -> onnx.ModelProto:
    """app/inference/reorder.onnx: Gather h and c rows by parent index."""
    from onnx import TensorProto, helper

    tensor = helper.make_tensor_value_info
    return _finish(helper.make_graph(
        [
            helper.make_node("Gather", ["h", "parents"], ["h_selected"], axis=0),
            helper.make_node("Gather", ["c", "parents"], ["c_selected"], axis=0),
        ],
        "reorder_beams",
        [tensor("h", TensorProto.FLOAT, ["rows_in", "hidden"]), tensor("c", TensorProto.FLOAT, ["rows_in", "hidden"]),
         tensor("parents", TensorProto.INT64, ["rows"])],
        [tensor("h_selected", TensorProto.FLOAT, ["rows", "hidden"]),
         tensor("c_selected", TensorProto.FLOAT, ["rows", "hidden"])],
    ))


def build_select_model() -> onnx.ModelProto:
    """app/inference/select.onnx: each row's k best log-probabilities (TopK: sorted, ties to the lower token id)
    and the <end> column, computed where the log-probabilities are."""
    from onnx import TensorProto, helper

    tensor = helper.make_tensor_value_info
    return _finish(helper.make_graph(
        [
            helper.make_node("TopK", ["log_probs", "k"], ["values", "indices"], axis=1, largest=1, sorted=1),
            helper.make_node("Gather", ["log_probs", "end"], ["end_log_probs"], axis=1),
        ],
        "select_candidates",
        [tensor("log_probs", TensorProto.FLOAT, ["rows", "vocab"]), tensor("k", TensorProto.INT64, [1]),
         tensor("end", TensorProto.INT64, [1])],
        [tensor("values", TensorProto.FLOAT, ["rows", "k"]), tensor("indices", TensorProto.INT64, ["rows", "k"]),
         tensor("end_log_probs", TensorProto.FLOAT, ["rows", 1])],
    ))


def write_graphs() -> None:
    """Regenerate both committed graphs."""
    import onnx

    onnx.save(build_reorder_model(), str(REORDER_GRAPH))
    onnx.save(build_select_model(), str(SELECT_GRAPH))


if __name__ == "__main__":  # pragma: no cover
    write_graphs()
