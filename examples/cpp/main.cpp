// Calls aigc_ext::attention_forward through the PyTorch dispatcher and checks it against a naive
// computation in double precision. Exit code 0 on success.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <iostream>

int main() {
  torch::manual_seed(0);
  const int64_t B = 2, H = 4, L = 37, S = 53, E = 40;
  auto q = torch::randn({B, H, L, E});
  auto k = torch::randn({B, H, S, E});
  auto v = torch::randn({B, H, S, E});
  const double scale = 1.0 / std::sqrt(static_cast<double>(E));

  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("aigc_ext::attention_forward", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(
                    const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const std::optional<at::Tensor>&, bool, double)>();
  for (bool causal : {false, true}) {
    auto [out, lse] = op.call(q, k, v, std::nullopt, causal, scale);

    auto s = torch::matmul(q.to(torch::kDouble), k.to(torch::kDouble).transpose(-2, -1)) * scale;
    if (causal) {
      auto hidden = torch::ones({L, S}, torch::kBool).triu(1);
      s = s.masked_fill(hidden, -std::numeric_limits<double>::infinity());
    }
    auto expected = torch::matmul(torch::softmax(s, -1), v.to(torch::kDouble));
    const double err = (out.to(torch::kDouble) - expected).abs().max().item<double>();
    const double lse_err =
        (lse.to(torch::kDouble) - torch::logsumexp(s, -1)).abs().max().item<double>();
    std::cout << "causal=" << causal << " max |out - naive| = " << err
              << ", max |lse - naive| = " << lse_err << std::endl;
    if (!(err < 1e-4) || !(lse_err < 1e-4)) {
      std::cerr << "mismatch against the naive computation" << std::endl;
      return 1;
    }
  }
  std::cout << "ok" << std::endl;
  return 0;
}
