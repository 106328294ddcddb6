"""fisher.footprint: training and score memory counted on the meta device, before anything is allocated."""
import torch
from torch import nn

from fisher.footprint import OPTIMIZER_COPIES, scores_bytes, training_bytes


def test_weights_four_times_and_every_layer_output_per_image():
    need = training_bytes(lambda: nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)),
                          lambda m, n: m(torch.zeros(n, 10)), batch_size=8)
    weights = (10 * 20 + 20) + (20 * 3 + 3)
    outputs = 20 + 20 + 3                      # leaf layers only: the Sequential's own output is not counted twice
    assert OPTIMIZER_COPIES == 4
    assert need == 4 * OPTIMIZER_COPIES * weights + 8 * 4 * outputs


def test_a_model_no_machine_holds_is_counted_without_allocating_it():
    need = training_bytes(lambda: nn.Linear(200_000, 200_000), lambda m, n: m(torch.zeros(n, 200_000)), 1)
    assert need > 4 * 4 * 4e10                 # 640 GB of float32 state: only shapes were made


def test_an_architecture_that_cannot_run_on_meta_gives_no_estimate():
    class Item(nn.Module):
        def forward(self, x):
            return x * float(x.sum().item())   # .item() needs data: no meta kernel
    assert training_bytes(Item, lambda m, n: m(torch.zeros(n, 4)), 8) == 0


def test_the_paper_priors_at_their_defaults_fit_a_laptop():
    from fisher.priors import build_prior
    for name, kw, size in [("pixelcnn", dict(channels=1, levels=2), 28), ("gated", dict(channels=3, levels=32), 32)]:
        c = kw["channels"]
        need = training_bytes(lambda: build_prior(name, **kw), lambda m, n: m.log_prob(torch.zeros(n, c, size, size)),
                              128)
        assert 10 * 2**20 < need < 4 * 2**30, (name, need)


def test_scores_count_weights_once_activations_and_the_largest_block_twice_per_image():
    need = scores_bytes(lambda: nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)),
                        lambda m, n: m(torch.zeros(n, 10)), chunk_size=32)
    weights, largest, outputs = (10 * 20 + 20) + (20 * 3 + 3), 10 * 20, 20 + 20 + 3
    assert need == 4 * weights + 32 * 4 * (outputs + 2 * largest)
