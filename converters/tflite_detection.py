"""An fp32 TFLite detector with TensorFlow Lite's standard custom op ``TFLite_Detection_PostProcess`` appended
(``convert --detector`` with ``[postprocess] tflite = true``): the file Android apps hand to an Interpreter (or,
with ObjectDetector metadata, the Task Library) to get boxes, classes, scores and a count.

The op takes box encodings (1, A, 4) as ``ty, tx, th, tw``, class scores (1, A, K) after the score function with
background in column 0 (or no background), and anchors (A, 4) as a constant ``cy, cx, h, w``; its custom options
are a flexbuffer map. The model's own outputs are rearranged to that: a GATHER of the regression's last axis when
it is torchvision's ``dx, dy, dw, dh`` (scales reordered with it), SOFTMAX or LOGISTIC on the logits. The op does
not clamp dw, dh as torchvision does (at ln(1000/16)): boxes differ only where exp(dw / scale) exceeds 62.5.
Only the fast (class-agnostic) NMS is offered: it is what mdeploy checks against its NumPy decoding + NMS."""

from __future__ import annotations

from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from mdeploy.detection import BOX_ORDERS, DetectorSpec, PostprocessOptions, class_scores, decode_boxes

CUSTOM_CODE = "TFLite_Detection_PostProcess"
OUTPUTS = ("detection_boxes", "detection_classes", "detection_scores", "num_detections")
TFLITE_METADATA = "TFLITE_METADATA"  # the raw model's Support metadata describes its outputs, not these


def custom_options(spec: DetectorSpec, options: PostprocessOptions, classes: int) -> bytes:
    from flatbuffers import flexbuffers

    scale = dict(zip(BOX_ORDERS[spec.box_order], spec.box_scales, strict=True))
    return bytes(flexbuffers.Dumps({
        "max_detections": options.max_detections, "max_classes_per_detection": 1, "detections_per_class": 100,
        "use_regular_nms": False, "nms_score_threshold": float(options.score_threshold),
        "nms_iou_threshold": float(options.iou_threshold), "num_classes": classes,
        "y_scale": float(scale["dy"]), "x_scale": float(scale["dx"]), "h_scale": float(scale["dh"]),
        "w_scale": float(scale["dw"]),
    }))


class _Appender:
    """Tensors, buffers and operators added to subgraph 0 of a read model (object API)."""

    def __init__(self, model: fb.ModelT) -> None:
        from mdeploy.converters.tflite_flatbuffer import _AlignedBuffer

        self.model, self.graph, self.aligned = model, model.subgraphs[0], _AlignedBuffer
        aligned = []
        for buffer in model.buffers:  # keep the weights on 16-byte boundaries when the file is written again
            copy = _AlignedBuffer()
            copy.data = buffer.data
            aligned.append(copy)
        model.buffers = aligned

    def index(self, name: str) -> int:
        names = [t.name.decode() if isinstance(t.name, bytes) else t.name for t in self.graph.tensors]
        return names.index(name)

    def tensor(self, name: str, shape: tuple[int, ...], kind: int, data: np.ndarray | None = None) -> int:
        tensor = fb.TensorT()
        tensor.name, tensor.shape, tensor.type, tensor.buffer = name, np.asarray(shape, np.int32), kind, 0
        if data is not None:
            buffer = self.aligned()
            buffer.data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            self.model.buffers.append(buffer)
            tensor.buffer = len(self.model.buffers) - 1
        self.graph.tensors.append(tensor)
        return len(self.graph.tensors) - 1

    def opcode(self, builtin: int, custom: str | None = None) -> int:
        for i, code in enumerate(self.model.operatorCodes):
            found = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and found == custom:
                return i
        code = fb.OperatorCodeT()
        code.builtinCode, code.version = builtin, 1
        code.deprecatedBuiltinCode = min(builtin, fb.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
        code.customCode = custom
        self.model.operatorCodes.append(code)
        return len(self.model.operatorCodes) - 1

    def op(self, builtin: int, inputs: list[int], outputs: list[int], options: Any = None, options_type: int = 0,
           custom: str | None = None, custom_options: bytes | None = None) -> None:
        operator = fb.OperatorT()
        operator.opcodeIndex = self.opcode(builtin, custom)
        operator.inputs, operator.outputs = np.asarray(inputs, np.int32), np.asarray(outputs, np.int32)
        if options is not None:
            operator.builtinOptionsType, operator.builtinOptions = options_type, options
        if custom_options is not None:
            operator.customOptions = np.frombuffer(custom_options, np.uint8)
            operator.customOptionsFormat = fb.CustomOptionsFormat.FLEXBUFFERS
        self.graph.operators.append(operator)


def append_postprocess(source: bytes, spec: DetectorSpec, options: PostprocessOptions,
                       metadata: bytes | None = None) -> bytes:
    """The fp32 TFLite model ``source`` (its outputs named as ``spec`` names them) with the post-processing op as
    its only outputs (``OUTPUTS``), and ``metadata`` (ObjectDetector's, ``tflite_detection_metadata``) as its
    TFLITE_METADATA instead of the raw model's."""
    import flatbuffers

    from mdeploy.converters.tflite_flatbuffer import FILE_IDENTIFIER, read_model

    if spec.background_class not in (0, None):
        raise ValueError("TFLite_Detection_PostProcess takes background in column 0 or none: background_class "
                         f"{spec.background_class} is not supported")
    model = read_model(source)  # (an archive of associated files after the flatbuffer is left behind)
    add = _Appender(model)
    boxes, logits = add.index(spec.boxes), add.index(spec.scores)
    anchors_count, columns = (int(d) for d in model.subgraphs[0].tensors[logits].shape[1:])
    classes = columns - (spec.background_class is not None)
    f32 = fb.TensorType.FLOAT32
    encodings = boxes
    if spec.box_order != "yxhw":  # dx, dy, dw, dh -> ty, tx, th, tw
        order = add.tensor("detection/box_order", (4,), fb.TensorType.INT32, np.asarray([1, 0, 3, 2], np.int32))
        encodings = add.tensor("detection/box_encodings", (1, anchors_count, 4), f32)
        gather = fb.GatherOptionsT()
        gather.axis, gather.batchDims = 2, 0
        add.op(fb.BuiltinOperator.GATHER, [boxes, order], [encodings], gather, fb.BuiltinOptions.GatherOptions)
    scores = add.tensor("detection/class_predictions", (1, anchors_count, columns), f32)
    if spec.score_function == "softmax":
        softmax = fb.SoftmaxOptionsT()
        softmax.beta = 1.0
        add.op(fb.BuiltinOperator.SOFTMAX, [logits], [scores], softmax, fb.BuiltinOptions.SoftmaxOptions)
    else:
        add.op(fb.BuiltinOperator.LOGISTIC, [logits], [scores])
    anchors = add.tensor("detection/anchors", (anchors_count, 4), f32,
                         spec.anchors[:, [1, 0, 3, 2]].astype(np.float32))  # cx, cy, w, h -> cy, cx, h, w
    count = options.max_detections
    outputs = [add.tensor(OUTPUTS[0], (1, count, 4), f32), add.tensor(OUTPUTS[1], (1, count), f32),
               add.tensor(OUTPUTS[2], (1, count), f32), add.tensor(OUTPUTS[3], (1,), f32)]
    add.op(fb.BuiltinOperator.CUSTOM, [encodings, scores, anchors], outputs, custom=CUSTOM_CODE,
           custom_options=custom_options(spec, options, classes))
    model.subgraphs[0].outputs = np.asarray(outputs, np.int32)
    for signature in model.signatureDefs or []:
        signature.outputs = []
        for name, index in zip(OUTPUTS, outputs, strict=True):
            entry = fb.TensorMapT()
            entry.name, entry.tensorIndex = name, index
            signature.outputs.append(entry)
    model.metadata = [m for m in model.metadata or []
                      if (m.name.decode() if isinstance(m.name, bytes) else m.name) != TFLITE_METADATA]
    if metadata is not None:
        buffer = add.aligned()
        buffer.data = np.frombuffer(metadata, np.uint8)
        model.buffers.append(buffer)
        entry = fb.MetadataT()
        entry.name, entry.buffer = TFLITE_METADATA, len(model.buffers) - 1
        model.metadata.append(entry)
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def reference_postprocess(regression: np.ndarray, logits: np.ndarray, spec: DetectorSpec,
                          options: PostprocessOptions) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """What the op computes, in NumPy, per sample: boxes (ymin, xmin, ymax, xmax normalised), classes (0-based
    after background) and scores of the detections kept by the fast NMS (each anchor's best class; score >=
    threshold; greedy, dropping IoU > threshold), best first. dw, dh are not clamped, as in the op."""
    decoded = decode_boxes(regression, spec.anchors, (1, 1), spec.box_order, spec.box_scales, clip=False)
    decoded = decoded[..., [1, 0, 3, 2]]  # x1, y1, x2, y2 -> ymin, xmin, ymax, xmax
    scores = class_scores(logits, spec.score_function, spec.background_class)
    found = []
    for boxes, table in zip(decoded, scores, strict=True):
        best, classes = table.max(axis=1), table.argmax(axis=1)
        candidates = np.nonzero(best >= options.score_threshold)[0]
        kept: list[int] = []
        for i in candidates[np.argsort(-best[candidates], kind="stable")]:
            if len(kept) == options.max_detections:
                break
            if all(iou(boxes[i], boxes[j]) <= options.iou_threshold for j in kept):
                kept.append(int(i))
        found.append((boxes[kept], classes[kept].astype(np.float64), best[kept]))
    return found


def iou(a: np.ndarray, b: np.ndarray) -> float:
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    if area_a <= 0 or area_b <= 0:
        return 0.0
    height = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    width = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = height * width
    return float(inter / (area_a + area_b - inter))


def run_postprocess(path: Any, inputs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The post-processed model's detections for ``inputs`` (N, C, H, W) float32 on the LiteRT interpreter, per
    sample as :func:`reference_postprocess` gives them."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    (feed,), fetches = interpreter.get_input_details(), interpreter.get_output_details()
    by_name = {fetch["name"]: fetch["index"] for fetch in fetches}
    found = []
    for image in np.asarray(inputs, np.float32):
        interpreter.set_tensor(feed["index"], np.transpose(image, (1, 2, 0))[None])
        interpreter.invoke()
        boxes, classes, scores, count = (interpreter.get_tensor(by_name[name]) for name in OUTPUTS)
        n = int(count[0])
        found.append((boxes[0, :n], classes[0, :n], scores[0, :n]))
    return found


def compare_detections(want: list[tuple[np.ndarray, ...]], got: list[tuple[np.ndarray, ...]]) -> dict[str, Any]:
    """How far the op's detections are from the NumPy reference's: same counts and classes, max |box| and
    |score| differences (normalised coordinates)."""
    same_count = all(len(w[0]) == len(g[0]) for w, g in zip(want, got, strict=True))
    same_classes = same_count and all(np.array_equal(w[1], g[1]) for w, g in zip(want, got, strict=True))
    box = max((float(np.abs(w[0] - g[0]).max(initial=0.0)) for w, g in zip(want, got, strict=True)
               if len(w[0]) == len(g[0])), default=0.0)
    score = max((float(np.abs(w[2] - g[2]).max(initial=0.0)) for w, g in zip(want, got, strict=True)
                 if len(w[0]) == len(g[0])), default=0.0)
    return {"samples": len(want), "detections": int(sum(len(w[0]) for w in want)), "same_count": same_count,
            "same_classes": same_classes, "box_max_abs_diff": box, "score_max_abs_diff": score}
