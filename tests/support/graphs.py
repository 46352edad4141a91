"""Graphs written by hand for tests: the IR of models whose framework reference is committed."""

from __future__ import annotations

from bnexporter.topology.graph import Graph, Node


def torch_small_graph() -> Graph:
    """The architecture of gen_census_ref.torch_model, written by hand."""
    def bn(name, src, eps=1e-5):
        return Node(name, "bn", (src,), {r: f"{name}.{k}" for r, k in (
            ("gamma", "weight"), ("beta", "bias"), ("mean", "running_mean"),
            ("var", "running_var"))}, {"eps": eps})

    def conv(name, src, bias, **attrs):
        params = {"kernel": f"{name}.weight"}
        if bias:
            params["bias"] = f"{name}.bias"
        return Node(name, "conv", (src,), params, attrs)

    nodes = (
        Node("x", "input"),
        conv("stem", "x", False, stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=1),
        bn("stem_bn", "stem"), Node("r0", "relu", ("stem_bn",)),
        conv("dw", "r0", True, stride=(1, 1), padding=(2, 2), dilation=(2, 2), groups=16),
        bn("dw_bn", "dw"), Node("d", "relu6", ("dw_bn",)),
        conv("gconv", "d", False, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=4,
             padding_mode="reflect"),
        bn("gconv_bn", "gconv", 1e-3), Node("s", "add", ("gconv_bn", "d")),
        Node("g", "relu", ("s",)),
        Node("mp", "maxpool", ("g",), attrs={"pool": (3, 3), "stride": (2, 2),
                                             "padding": (1, 1), "ceil_mode": True}),
        Node("ap", "avgpool", ("g",), attrs={"pool": (3, 3), "stride": (2, 2),
                                             "padding": (1, 1), "ceil_mode": True,
                                             "count_include_pad": True}),
        Node("c", "concat", ("mp", "ap"), attrs={"axis": 1}),
        conv("pw", "c", True, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1),
        bn("pw_bn", "pw"), Node("p", "hardswish", ("pw_bn",)),
        conv("down", "p", False, stride=(2, 1), padding=(1, 0), dilation=(1, 1), groups=1),
        bn("down_bn", "down"), Node("q", "relu", ("down_bn",)),
        Node("flat", "flatten", ("q",)),
        Node("fc", "dense", ("flat",), {"kernel": "fc.weight", "bias": "fc.bias"}),
        bn("fc_bn", "fc"), Node("f", "relu", ("fc_bn",)),
        Node("head", "dense", ("f",), {"kernel": "head.weight", "bias": "head.bias"}),
    )
    return Graph(nodes, source="test", layout="nchw", kernel_layout="oihw",
                 input_shape=(3, 16, 16))
