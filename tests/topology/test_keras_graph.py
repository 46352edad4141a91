from bnexporter.topology.keras_graph import KerasGraph


def _k2_layer(name, cls, inputs, **cfg):
    nodes = [[[src, 0, 0, {}] for src in inputs]] if inputs else []
    return {"class_name": cls, "name": name, "config": {"name": name, **cfg},
            "inbound_nodes": nodes}


def _k3_layer(name, cls, inputs, **cfg):
    args = [{"class_name": "__keras_tensor__",
             "config": {"shape": [None, 8], "keras_history": [src, 0, 0]}} for src in inputs]
    nodes = [{"args": args, "kwargs": {}}] if inputs else []
    return {"module": "keras.layers", "class_name": cls, "name": name,
            "config": {"name": name, **cfg}, "inbound_nodes": nodes}


def test_keras2_functional_consumers():
    layers = [
        _k2_layer("in", "InputLayer", []),
        _k2_layer("conv", "Conv2D", ["in"]),
        _k2_layer("bn_relu", "BatchNormalization", ["conv"], epsilon=1e-3),
        _k2_layer("relu", "ReLU", ["bn_relu"]),
        _k2_layer("bn_relu6", "BatchNormalization", ["relu"]),
        _k2_layer("r6", "ReLU", ["bn_relu6"], max_value=6.0),
        _k2_layer("bn_add", "BatchNormalization", ["r6"]),
        _k2_layer("add", "Add", ["bn_add", "r6"]),
        _k2_layer("bn_drop", "BatchNormalization", ["add"]),
        _k2_layer("drop", "Dropout", ["bn_drop"]),
        _k2_layer("act", "Activation", ["drop"], activation="relu"),
        _k2_layer("bn_leaky", "BatchNormalization", ["act"]),
        _k2_layer("leaky", "LeakyReLU", ["bn_leaky"]),
        _k2_layer("bn_lin", "BatchNormalization", ["leaky"]),
        _k2_layer("proj", "Conv2D", ["bn_lin"]),
        _k2_layer("bn_out", "BatchNormalization", ["proj"]),
        _k2_layer("bn_op", "BatchNormalization", ["proj"]),
        _k2_layer("tfop", "TFOpLambda", ["bn_op"], function="nn.relu6"),
    ]
    g = KerasGraph({"class_name": "Functional", "config": {"layers": layers}})
    bns = [b for b in g.layers.values() if "BatchNormalization" in b.class_name]
    got = {b.name: g.consumer(b.name) for b in bns}
    assert got == {"bn_relu": "relu", "bn_relu6": "relu6", "bn_add": "add", "bn_drop": "relu",
                   "bn_leaky": "other", "bn_lin": "linear", "bn_out": "linear",
                   "bn_op": "relu6"}


def test_keras3_nodes_and_nested_model_output_is_unknown():
    inner = {"class_name": "Functional", "name": "backbone", "config": {
        "name": "backbone", "layers": [
        _k3_layer("x", "InputLayer", []),
        _k3_layer("c", "Conv2D", ["x"]),
        _k3_layer("bn_in", "BatchNormalization", ["c"]),
        _k3_layer("a", "Activation", ["bn_in"], activation="relu6"),
        _k3_layer("bn_last", "BatchNormalization", ["a"]),
    ]}, "inbound_nodes": []}
    outer = {"class_name": "Functional", "config": {"layers": [
        _k3_layer("input", "InputLayer", []), inner, _k3_layer("head", "Dense", ["backbone"])]}}
    g = KerasGraph(outer)
    assert g.consumer("bn_in") == "relu6"
    assert g.consumer("bn_last") == "unknown"


def test_sequential_uses_the_next_layer():
    cfg = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "InputLayer", "config": {"name": "i"}},
        {"class_name": "Dense", "config": {"name": "d"}},
        {"class_name": "BatchNormalization", "config": {"name": "bn"}},
        {"class_name": "Activation", "config": {"name": "a", "activation": "relu"}},
        {"class_name": "BatchNormalization", "config": {"name": "bn_end"}},
    ]}}
    g = KerasGraph(cfg)
    assert g.consumer("bn") == "relu"
    assert g.consumer("bn_end") == "linear"
