// The AMX tile configuration shared by the bf16 forward kernel and benchmarks/amx_probe.cpp.
// No torch headers: the probe builds without torch.
#pragma once

#include <cstdint>

namespace aigc_ext::cpu {

// The 64-byte memory operand of LDTILECFG for palette 1: bytes per row and rows of each tile.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All eight tiles as 16 rows x 64 bytes: 16 x 32 bf16 (A operands), 16 bf16 pairs x 16 columns
// (B operands in VNNI layout) or 16 x 16 fp32 (results).
inline AmxTileConfig amx_full_tiles() {
  AmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  return cfg;
}

#if defined(__x86_64__)
// Loads cfg into the tile registers. Own asm rather than _tile_loadconfig: GCC 12's intrinsic
// declares a pointer-sized memory operand, so the stores that fill cfg could be dropped as dead.
inline void amx_load_config(const AmxTileConfig& cfg) { asm volatile("ldtilecfg %0" : : "m"(cfg)); }
#endif

}  // namespace aigc_ext::cpu
