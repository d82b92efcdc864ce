"""``Linear``'s compiled single-row path: the same numbers as ``nn.Linear``, taken only where it pays."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_fwp.modeling.layers_feature_maps import FeatureMap
from hf_fwp.layers import Linear


def compiled_graphs(fn, *args):
    """Run ``fn`` compiled and return ``(output, [FX graphs dynamo captured])``."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, graphs


def calls_linear(graphs) -> bool:
    return any(node.target in (F.linear, torch._C._nn.linear) for gm in graphs for node in gm.graph.nodes)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 48), (4, 1, 48), (1, 3, 48)])
def test_compiled_linear_matches_eager(bias, shape):
    torch.manual_seed(0)
    layer = Linear(48, 40, bias=bias)
    x = torch.randn(*shape)
    out, graphs = compiled_graphs(layer, x)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    # One row takes the reduction form; several rows keep the library's matrix product.
    single = x.numel() == x.shape[-1]
    assert calls_linear(graphs) != single


def test_eager_linear_is_plain():
    torch.manual_seed(0)
    layer = Linear(16, 8)
    assert isinstance(layer, nn.Linear)
    x = torch.randn(1, 16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_lora_wraps_linear_and_compiles():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(Linear(16, 16), nn.ReLU(), Linear(16, 4))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    lora.eval()
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        eager = lora(x)
        out, _ = compiled_graphs(lora, x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["hedgehog", "t2r"])
def test_compiled_feature_map_single_row(name):
    torch.manual_seed(0)
    fmap = FeatureMap(name, 3, 8)
    with torch.no_grad():
        fmap.weight.add_(0.3 * torch.randn_like(fmap.weight))
        if fmap.bias is not None:
            fmap.bias.normal_()
        x = torch.randn(1, 1, 3, 8)
        out, _ = compiled_graphs(fmap, x)
        torch.testing.assert_close(out, fmap(x), rtol=1e-5, atol=1e-5)
