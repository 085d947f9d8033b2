// Host-only program: CUTLASS's CuTe layouts of the tensor-core operands the kernels use, printed
// for python_tests/test_emulator.py to compare with the emulator's (which the emulated kernel
// tests hold the kernels to). Needs CuTe's headers (the nvidia-cutlass wheel installs them) and
// nvcc; runs no device code.
//
// Output, one record per line:
//   map <name> <threads> <elements> <row col ...>: a (thread, element) -> (row, column) layout.
//   desc <name> <mn_major> <rows> <start> <lbo> <sbo> <layout> <base> <address ...>: a 16-bit
//     operand tile of `rows` M (or N) rows and 16 k, in one of the kernels' 128-byte-swizzled
//     shared-memory layouts: its start offset in bytes (unswizzled), the LBO and SBO in bytes and
//     the layout type and base offset of CuTe's make_gmma_desc for it, then the byte offset of
//     each element (i, k), i-major, as CuTe addresses it.
#include <cstdint>
#include <cstdio>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

using namespace cute;
using Elem = cutlass::bfloat16_t;

// A (thread, value) -> index layout over an (rows x cols) column-major coordinate space.
template <class TV>
void print_map(const char* name, TV tv, int rows, int threads, int values) {
  std::printf("map %s %d %d", name, threads, values);
  for (int t = 0; t < threads; ++t)
    for (int v = 0; v < values; ++v) {
      const int idx = tv(t, v), r = idx % rows, c = idx / rows;
      std::printf(" %d %d", r, c);
    }
  std::printf("\n");
}

alignas(1024) static Elem smem[64 * 1024];  // the swizzle atoms need 1024-byte alignment

template <SM90::GMMA::Major kMajor, class Tile>
void print_desc(const char* name, Tile const& tile, int rows) {
  const GmmaDescriptor d = SM90::GMMA::make_gmma_desc<kMajor>(tile);
  const long start = static_cast<long>(raw_pointer_cast(tile.data()) - smem) * 2;
  std::printf("desc %s %d %d %ld %d %d %d %d", name, kMajor == SM90::GMMA::Major::MN ? 1 : 0, rows,
              start, d.bitfield.leading_byte_offset_ * 16, d.bitfield.stride_byte_offset_ * 16,
              static_cast<int>(d.bitfield.layout_type_), static_cast<int>(d.bitfield.base_offset_));
  for (int i = 0; i < rows; ++i)
    for (int k = 0; k < 16; ++k)
      std::printf(" %ld", static_cast<long>(reinterpret_cast<const char*>(&tile(i, k)) -
                                            reinterpret_cast<const char*>(smem)));
  std::printf("\n");
}

int main() {
  // mma.sync m16n8k16 (bf16 in, f32 accumulate): A 16 x 16, B 8 x 16 (n, k), C 16 x 8.
  using Mma = MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>;
  print_map("mma_a", typename Mma::ALayout{}, 16, 32, 8);
  print_map("mma_b", typename Mma::BLayout{}, 8, 32, 4);
  print_map("mma_c", typename Mma::CLayout{}, 16, 32, 4);
  // wgmma m64nNk16: A from registers 64 x 16, accumulators 64 x N.
  print_map("wgmma_a", SM90::GMMA::ALayout_64x16{}, 64, 128, 8);
  print_map("wgmma_d64", SM90::GMMA::CLayout_64xN<64>{}, 64, 128, 32);
  print_map("wgmma_d128", SM90::GMMA::CLayout_64xN<128>{}, 64, 128, 64);
  print_map("wgmma_d256", SM90::GMMA::CLayout_64xN<256>{}, 64, 128, 128);

  char name[64];
  // K-major, 128-byte swizzle: 64 rows x 512 columns in 64-column panels (h, and a 64-slot tile
  // of M in the forward), its k16 steps across the first panel and into the second.
  auto k64 = make_tensor(make_smem_ptr(smem), tile_to_shape(SM90::GMMA::Layout_K_SW128_Atom<Elem>{},
                                                            Shape<_64, _512>{}));
  for (int kk = 0; kk < 6; ++kk) {
    std::snprintf(name, sizeof(name), "K64-k%d", kk);
    print_desc<SM90::GMMA::Major::K>(name, local_tile(k64, Shape<_64, _16>{}, make_coord(0, kk)),
                                     64);
  }
  // K-major, 128 rows x 64 columns: the backward's 128-slot chunk of M.
  auto k128 =
      make_tensor(make_smem_ptr(smem),
                  tile_to_shape(SM90::GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<_128, _64>{}));
  for (int kk = 0; kk < 4; ++kk) {
    std::snprintf(name, sizeof(name), "K128-k%d", kk);
    print_desc<SM90::GMMA::Major::K>(name, local_tile(k128, Shape<_128, _16>{}, make_coord(0, kk)),
                                     128);
  }
  // MN-major, 128-byte swizzle: a 64-slot tile of M read as B of P M (N = D columns in 64-column
  // panels of 64 k rows each), each warpgroup's half of D at every k16 step; D = 512, 256, 128.
  auto mn512 = make_tensor(
      make_smem_ptr(smem),
      tile_to_shape(SM90::GMMA::Layout_MN_SW128_Atom<Elem>{}, Shape<_512, _64>{}, Step<_2, _1>{}));
  auto mn256 = make_tensor(
      make_smem_ptr(smem),
      tile_to_shape(SM90::GMMA::Layout_MN_SW128_Atom<Elem>{}, Shape<_256, _64>{}, Step<_2, _1>{}));
  auto mn128 = make_tensor(
      make_smem_ptr(smem),
      tile_to_shape(SM90::GMMA::Layout_MN_SW128_Atom<Elem>{}, Shape<_128, _64>{}, Step<_2, _1>{}));
  for (int half = 0; half < 2; ++half)
    for (int kk = 0; kk < 4; ++kk) {
      std::snprintf(name, sizeof(name), "MN256-h%d-k%d", half, kk);
      print_desc<SM90::GMMA::Major::MN>(
          name, local_tile(mn512, Shape<_256, _16>{}, make_coord(half, kk)), 256);
      std::snprintf(name, sizeof(name), "MN128-h%d-k%d", half, kk);
      print_desc<SM90::GMMA::Major::MN>(
          name, local_tile(mn256, Shape<_128, _16>{}, make_coord(half, kk)), 128);
      std::snprintf(name, sizeof(name), "MN64-h%d-k%d", half, kk);
      print_desc<SM90::GMMA::Major::MN>(
          name, local_tile(mn128, Shape<_64, _16>{}, make_coord(half, kk)), 64);
    }
  return 0;
}
