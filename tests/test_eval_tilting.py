"""The latent-tilting experiment: the tilted log-likelihood estimator against exact answers, the toy
sample-quality measures, and a tiny end-to-end run of `scripts/evaluate.py latent-tilting`."""
import json
import math

import pytest
import torch
from conftest import run_script

from data.toy2d import Gaussians25, SwissRoll
from models.mlp_vae import MLPVAE, MLPVAEConfig
from trainer.evaluation.tilting_metrics import (
    distance_to_curve,
    modes_covered,
    prior_energies,
    roll_curve,
    swiss_roll_log_prob,
    tilted_iwae,
)
from trainer.evaluation.toy_metrics import (
    log_integral_on_grid,
    log_partition_from_base_samples,
    square_grid,
)


def small_vae(latent_dim: int) -> MLPVAE:
    torch.manual_seed(0)
    return MLPVAE(MLPVAEConfig(data_dim=2, latent_dim=latent_dim, hidden=16, depth=2)).eval().requires_grad_(False)


def test_a_constant_energy_leaves_the_likelihood_unchanged():
    """E ≡ c: the tilt weights are the base weights times e^−c and log Z = −c, so log p_tilt = log p_base."""
    vae, c = small_vae(4), 1.75  # exact in float32
    energy = lambda x: torch.full((x.shape[0],), c)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1))
    base, tilted = tilted_iwae(vae, energy, x, 64, torch.Generator().manual_seed(2), block=500)  # several chunks
    log_z = log_partition_from_base_samples(prior_energies(vae, energy, 1000, torch.Generator().manual_seed(3))[1])
    assert log_z.value == pytest.approx(-c, abs=1e-12) and log_z.stderr == 0.0
    torch.testing.assert_close(tilted - log_z.value, base, rtol=0, atol=1e-9)
    # ... and the base estimate is the VAE's own IWAE (same draws, same weights).
    reference = vae.log_likelihood(x, 64, generator=torch.Generator().manual_seed(2)).double()
    torch.testing.assert_close(base, reference, rtol=0, atol=1e-4)


def test_tilted_likelihood_matches_quadrature_over_a_one_dimensional_latent():
    """With a 1-d latent, p_tilt(x) = ∫N(z)e^−E(G(z))p(x|z)dz / ∫N(z)e^−E(G(z))dz is a 1-D integral."""
    vae = small_vae(1)
    with torch.no_grad():
        vae.decoder[-1].weight[:2] *= 6.0  # decoder means spread over about ±1.7 as z goes over ±3
    energy = lambda x: 1.5 * x[:, 0] - x[:, 1]  # a tilt that moves the likelihood by far more than the tolerance
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(4)) * 0.5
    z = torch.linspace(-9, 9, 18_001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        mean, log_sigma = (t.double() for t in vae.decode_params(z.float()))
    log_prior = -0.5 * z[:, 0] ** 2 - 0.5 * math.log(2 * math.pi) - energy(mean)  # [Z] unnormalized tilted prior
    log_px_z = torch.distributions.Normal(mean[:, None, :], log_sigma.exp()[:, None, :]).log_prob(x.double()).sum(-1)
    exact_log_z = float(torch.logsumexp(log_prior, 0)) + math.log(float(z[1] - z[0]))
    exact = torch.logsumexp(log_prior[:, None] + log_px_z, 0) + math.log(float(z[1] - z[0])) - exact_log_z

    base, tilted = tilted_iwae(vae, energy, x, 20_000, torch.Generator().manual_seed(5))
    log_z = log_partition_from_base_samples(prior_energies(vae, energy, 400_000, torch.Generator().manual_seed(6))[1])
    assert abs(log_z.value - exact_log_z) < max(4 * log_z.stderr, 1e-3), (log_z, exact_log_z)
    torch.testing.assert_close(tilted - log_z.value, exact, rtol=0, atol=0.02)
    assert float((exact - base).abs().mean()) > 0.2  # the base VAE's likelihood is a different number


def test_swiss_roll_density_is_normalized_and_its_curve_is_the_datasets():
    grid, area = square_grid(4.0, 0.04)
    log_p = swiss_roll_log_prob(grid, noise=0.2, t_points=2_000, block=4_096)
    assert log_integral_on_grid(log_p, area) == pytest.approx(0.0, abs=2e-3)
    on_curve = SwissRoll(noise=0.0).sample(500, torch.Generator().manual_seed(0))
    assert float(distance_to_curve(on_curve, roll_curve()).max()) < 1e-3
    off_curve = on_curve + torch.tensor([10.0, 0.0])
    assert float(distance_to_curve(off_curve, roll_curve()).min()) > 5.0


def test_modes_covered_needs_a_share_of_the_samples():
    truth = Gaussians25()
    points = torch.cat([truth.means[:24].repeat_interleave(100, dim=0), truth.means[24:]]).float()  # 2401 points
    assert modes_covered(truth, points, min_share=0.1) == 24  # the last mode's 1 point is under 0.1·2401/25
    assert modes_covered(truth, points, min_share=0.0) == 25
    assert modes_covered(truth, points + 0.5, min_share=0.0) == 0  # halfway between modes: none is near


def test_seed_summary_means_and_standard_errors():
    from trainer.evaluation.toy_metrics import summarize_seeds

    per_seed = [{"a": 1.0, "b": 5.0}, {"a": 2.0}, {"a": 6.0, "b": 7.0}]
    summary = summarize_seeds(per_seed, ["a", "b", "missing"])
    assert summary["a"] == pytest.approx(3.0) and summary["b"] == pytest.approx(6.0) and "missing" not in summary
    assert summary["a_seed_stderr"] == pytest.approx(math.sqrt(7.0 / 3.0))  # std 2.6458 / √3
    assert summary["b_seed_stderr"] == pytest.approx(1.0)
    assert "a_seed_stderr" not in summarize_seeds(per_seed[:1], ["a"])  # one seed: no error across seeds


def test_energy_gap_summary_tells_a_settled_gap_from_a_growing_one(tmp_path):
    from trainer.evaluation.train_models import energy_gap_summary

    def summary(gaps):
        rows = [{"step": 10 * (i + 1), "energy_gap": gap} for i, gap in enumerate(gaps)]
        (tmp_path / "stats.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
        return energy_gap_summary(tmp_path)

    wiggle = [0.05 * (-1) ** i for i in range(100)]
    settled = summary([2.0 * (1 - math.exp(-i / 10)) + w for i, w in enumerate(wiggle)])
    growing = summary([0.05 * i + w for i, w in enumerate(wiggle)])
    assert settled["energy_gap_settled"] == 1.0 and growing["energy_gap_settled"] == 0.0
    assert settled["energy_gap_tail_mean"] == pytest.approx(2.0, abs=0.01)
    assert growing["energy_gap_tail_slope"] == pytest.approx(0.5, abs=0.01)  # per 100 iterations
    assert growing["energy_gap"] == pytest.approx(0.05 * 99 - 0.05) and len(growing["energy_gap_curve"]) == 50


@pytest.mark.slow
def test_latent_tilting_end_to_end(tmp_path):
    out, run_dir = tmp_path / "tilting.json", tmp_path / "run"
    run_script("evaluate.py", "latent-tilting", "--quick", "--skip-digits", "--out", str(out), "--run-dir", str(run_dir),
               "--vae-steps", "20", "--ebm-steps", "3", "--ebm-batch", "32", "--ebm-langevin-steps", "5",
               "--sample-steps", "5", "--samples", "300", "--test-points", "100", "--iwae-samples", "20",
               "--log-z-samples", "2000", "--grid-step", "0.25", "--grid-iwae-samples", "10", "--seeds", "2")
    result = json.loads(out.read_text())
    for toy in ("gaussians", "swissroll"):
        for key in ("true_hq_frac", "base_hq_frac", "tilted_hq_frac", "base_mean_hq_frac", "tilted_mean_hq_frac",
                    "exact_tilt_hq_frac", "exact_tilt_mean_hq_frac", "true_ll", "base_ll", "tilted_ll", "tilted_ll_mc",
                    "log_z", "log_z_grid", "log_z_ess"):
            for name in (f"{toy}_{key}", f"{toy}_{key}_seed_stderr"):
                assert isinstance(result[name], float) and math.isfinite(result[name]), (name, result[name])
        assert 0.97 < result[f"{toy}_true_hq_frac"] <= 1.0  # the truth is "high quality" by either definition
        assert abs(result[f"{toy}_base_log_mass_grid"]) < 0.05  # the grid holds the VAE's whole mass
        assert (run_dir / f"{toy}_samples_tilted_mean.png").is_file()
    for key in ("base_modes", "tilted_modes", "base_mean_hq_frac", "exact_tilt_hq_frac", "log_z_grid"):
        assert result[key] == result[f"gaussians_{key}"]
    assert 0 <= result["base_modes"] <= 25 and result["gaussians_true_modes"] == 25
    assert result["true_ll"] == result["gaussians_true_ll"] and result["base_ll"] < result["true_ll"]
    assert result["seeds"] == [0, 1] and len(result["per_seed"]) == 2 and result["per_seed"][1]["seed"] == 1
    assert result["gaussians_base_ll"] == pytest.approx(
        sum(row["gaussians_base_ll"] for row in result["per_seed"]) / 2)
    assert result["ebm_steps"] == 3 and result["quick"] is True and "digits_base_fd" not in result


def test_unknown_toy_is_a_one_line_error(tmp_path):
    result = run_script("evaluate.py", "latent-tilting", "--datasets", "moons", "--skip-digits",
                        "--run-dir", str(tmp_path / "run"), check=False)
    assert result.returncode == 2 and "moons" in result.stderr and "Traceback" not in result.stderr
