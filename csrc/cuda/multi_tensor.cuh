// Multi-tensor apply machinery for the atax CUDA kernels.
//
// A *table* describes L lists of n tensors (list l, tensor i) that all have the same numel per i:
//   ptrs[l * n + i]     int64  device address of tensor (l, i) (contiguous)
//   dtypes[l * n + i]   int8   0 = float32, 1 = bfloat16, 2 = float16
//   segments            (tensor index, start element, length) pieces of the tensors, length <= kChunk
//   chunk_seg[c..c+1)   the segments that block c processes (a chunk = up to kChunk elements and at
//                       most kMaxSegsPerChunk segments; several small tensors share one chunk)
//   tensor_seg[i..i+1)  the segments of tensor i (segments are ordered by tensor, then start)
// Chunking depends only on the numels (fixed kChunk, independent of the grid), so every reduction
// built on it is deterministic. A tensor larger than the free room of the current chunk starts a new
// chunk and is cut at multiples of kChunk from its own start, so the 16-byte alignment of each piece
// equals the alignment of the tensor's base pointer. Zero-size tensors get no segment.
//
// Tables are built on the host and cached (key: device, L, n, data_ptrs, numels, dtypes; LRU of
// kCacheSize entries). The table content is a pure function of the key, so a hit is always correct,
// even when the key's memory was freed and re-allocated in between.
//
// Upload and CUDA graphs:
//  * eager, miss: the table is written to a pinned host tensor and copied with ONE non-blocking H2D
//    copy on the current stream (no host sync). A CUDA event is recorded after the upload; a later use
//    from another stream waits on it with cudaStreamWaitEvent (no host sync), and the device buffer is
//    recordStream()-ed so an LRU eviction never frees memory that another stream still reads.
//  * capturing, hit: the entry is marked *permanent* (never evicted), since the graph keeps its device
//    address. No event wait during capture (torch.cuda.graph synchronizes before it captures).
//  * capturing, miss: the table is written to host memory from cudaHostAlloc (called under a relaxed
//    capture-mode guard, like torch's own allocator) and copied with cudaMemcpyAsync on the capturing
//    stream, which records a memcpy node that re-reads that host buffer at each replay; the device
//    buffer comes from the graph's private pool. Its device buffer is filled only when the graph is
//    replayed, so the entry is NOT put in the shared cache (an eager call before the first replay
//    would read an unfilled table): it is kept alive, never freed, in a separate list (host and device
//    buffers must outlive every graph that replays the copy). So a capture works with or without a
//    warm-up call; warm-up is still the cheaper path (the replayed graph then has no memcpy node).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace atax {
namespace cuda {

constexpr int64_t kChunk = int64_t(1) << 16;  // elements per chunk (fixed: determinism)
constexpr int kMaxSegsPerChunk = 64;          // bounds the serial work of one block
constexpr int kThreads = 256;                 // block size of the chunk kernels (fixed: determinism)
constexpr int kVec = 8;                       // elements per vector step (16 B of 16-bit, 32 B of fp32)
constexpr size_t kCacheSize = 64;

enum DtypeCode : int8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline int8_t dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK(false, "atax (CUDA): unsupported dtype ", t.scalar_type(),
                  " (expected float32, bfloat16 or float16)");
  }
  return kF32;
}

// What the kernels see (passed by value).
struct TableView {
  const int64_t* ptrs;        // [L * n]
  const int64_t* seg_start;   // [S]
  const int32_t* seg_tensor;  // [S]
  const int32_t* seg_len;     // [S]
  const int32_t* chunk_seg;   // [C + 1]
  const int32_t* tensor_seg;  // [n + 1]
  const int8_t* dtypes;       // [L * n]
  int32_t n;
  int32_t L;
  int32_t num_segs;
  int32_t num_chunks;
};

// ---------------------------------------------------------------------------------------------------
// Device helpers: loads with upcast, stores with one rounding.
// The table holds raw addresses, so the compiler cannot prove they are global memory and would emit
// generic LD/ST; __builtin_assume(__isGlobal(p)) turns them into LDG/STG (LDG.E.128 on the fast path).
// ---------------------------------------------------------------------------------------------------
#define ATAX_ASSUME_GLOBAL(p) __builtin_assume(__isGlobal(p))

__device__ __forceinline__ float load1(const void* base, int8_t dt, int64_t idx) {
  ATAX_ASSUME_GLOBAL(base);
  if (dt == kF32) return static_cast<const float*>(base)[idx];
  if (dt == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[idx]);
  return __half2float(static_cast<const __half*>(base)[idx]);
}

__device__ __forceinline__ void store1(void* base, int8_t dt, int64_t idx, float v) {
  ATAX_ASSUME_GLOBAL(base);
  if (dt == kF32) {
    static_cast<float*>(base)[idx] = v;
  } else if (dt == kBF16) {
    static_cast<__nv_bfloat16*>(base)[idx] = __float2bfloat16_rn(v);
  } else {
    static_cast<__half*>(base)[idx] = __float2half_rn(v);
  }
}

// 8 elements starting at idx (idx % 8 == 0 and base 16-byte aligned): 128-bit loads.
__device__ __forceinline__ void load8(const void* base, int8_t dt, int64_t idx, float (&out)[kVec]) {
  ATAX_ASSUME_GLOBAL(base);
  if (dt == kF32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + idx);
    float4 a = p[0];
    float4 b = p[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  } else {
    uint4 u = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + idx);
    uint32_t w[4] = {u.x, u.y, u.z, u.w};
    if (dt == kBF16) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        // bf16 -> fp32 is a shift.
        out[2 * q] = __uint_as_float(w[q] << 16);
        out[2 * q + 1] = __uint_as_float(w[q] & 0xffff0000u);
      }
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        __half2 h = *reinterpret_cast<const __half2*>(&w[q]);
        float2 f = __half22float2(h);
        out[2 * q] = f.x;
        out[2 * q + 1] = f.y;
      }
    }
  }
}

__device__ __forceinline__ void store8(void* base, int8_t dt, int64_t idx, const float (&v)[kVec]) {
  ATAX_ASSUME_GLOBAL(base);
  if (dt == kF32) {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(base) + idx);
    p[0] = make_float4(v[0], v[1], v[2], v[3]);
    p[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
    if (dt == kBF16) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * q], v[2 * q + 1]);
        w[q] = *reinterpret_cast<uint32_t*>(&h);
      }
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        __half2 h = __floats2half2_rn(v[2 * q], v[2 * q + 1]);
        w[q] = *reinterpret_cast<uint32_t*>(&h);
      }
    }
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + idx) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

__device__ __forceinline__ int esize(int8_t dt) { return dt == kF32 ? 4 : 2; }

__device__ __forceinline__ bool aligned16(const void* base, int8_t dt, int64_t start) {
  return ((reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(start) * esize(dt)) & 15u) == 0;
}

// ---------------------------------------------------------------------------------------------------
// Host side: table build, cache, upload.
// ---------------------------------------------------------------------------------------------------
struct TableEntry {
  at::Tensor device_buf;  // uint8 on the device
  at::Tensor host_buf;    // pinned host copy (eager path); keeps the pinned block alive
  void* leaked_host = nullptr;  // cudaHostAlloc'd buffer of a table built during capture (never freed)
  TableView view{};
  int64_t total_numel = 0;  // elements per list
  std::shared_ptr<at::cuda::CUDAEvent> ready;  // recorded after the upload (eager path)
  cudaStream_t upload_stream = nullptr;
  bool permanent = false;  // referenced by a captured graph: never evicted
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& k) const noexcept {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : k) {
      h ^= static_cast<uint64_t>(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    }
    return static_cast<size_t>(h);
  }
};

class TableCache {
 public:
  using Key = std::vector<int64_t>;
  std::mutex mu;
  std::list<Key> lru;  // front = most recent
  std::unordered_map<Key, std::pair<std::shared_ptr<TableEntry>, std::list<Key>::iterator>, KeyHash> map;

  std::shared_ptr<TableEntry> find(const Key& k) {
    auto it = map.find(k);
    if (it == map.end()) return nullptr;
    lru.splice(lru.begin(), lru, it->second.second);
    return it->second.first;
  }
  void insert(const Key& k, std::shared_ptr<TableEntry> e) {
    lru.push_front(k);
    map.emplace(k, std::make_pair(std::move(e), lru.begin()));
    // Evict least recently used, non-permanent entries.
    size_t guard = lru.size();
    auto it = lru.end();
    while (map.size() > kCacheSize && guard-- > 0 && it != lru.begin()) {
      --it;
      auto mit = map.find(*it);
      if (mit != map.end() && !mit->second.first->permanent) {
        map.erase(mit);
        it = lru.erase(it);
      }
    }
  }
};

inline TableCache& table_cache() {
  static TableCache* c = new TableCache();  // leaked on purpose: no teardown-order problems
  return *c;
}

// Tables built during a capture (guarded by table_cache().mu): alive for the process, never looked up.
inline std::vector<std::shared_ptr<TableEntry>>& captured_tables() {
  static auto* v = new std::vector<std::shared_ptr<TableEntry>>();
  return *v;
}

inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// lists[l][i]: contiguous tensors, same numel for every l given i, same device.
inline std::shared_ptr<TableEntry> get_table(const std::vector<std::vector<at::Tensor>>& lists) {
  const int64_t L = static_cast<int64_t>(lists.size());
  TORCH_INTERNAL_ASSERT(L >= 1);
  const int64_t n = static_cast<int64_t>(lists[0].size());
  TORCH_CHECK(n < (int64_t(1) << 30), "atax (CUDA): too many tensors");
  const auto device = lists[0][0].device();

  TableCache::Key key;
  key.reserve(3 + L * n * 2 + n);
  key.push_back(device.index());
  key.push_back(L);
  key.push_back(n);
  for (int64_t i = 0; i < n; ++i) key.push_back(lists[0][i].numel());
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& t = lists[l][i];
      key.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
      key.push_back(dtype_code(t));
    }
  }

  auto stream = at::cuda::getCurrentCUDAStream(device.index());
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;

  auto& cache = table_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  if (auto e = cache.find(key)) {
    if (capturing) {
      e->permanent = true;
    } else if (e->upload_stream != stream.stream()) {
      if (e->ready) e->ready->block(stream);
      c10::cuda::CUDACachingAllocator::recordStream(e->device_buf.storage().data_ptr(), stream);
    }
    return e;
  }

  // ---- build the segment list on the host
  std::vector<int64_t> seg_start;
  std::vector<int32_t> seg_tensor, seg_len, chunk_seg, tensor_seg;
  tensor_seg.reserve(n + 1);
  int64_t fill = 0;      // elements in the current chunk
  int32_t nseg_cur = 0;  // segments in the current chunk
  int64_t total = 0;
  auto close_chunk = [&]() {
    if (nseg_cur > 0) chunk_seg.push_back(static_cast<int32_t>(seg_start.size()));
    fill = 0;
    nseg_cur = 0;
  };
  chunk_seg.push_back(0);
  for (int64_t i = 0; i < n; ++i) {
    tensor_seg.push_back(static_cast<int32_t>(seg_start.size()));
    const int64_t N = lists[0][i].numel();
    total += N;
    if (N == 0) continue;
    if (fill > 0 && N > kChunk - fill) close_chunk();  // big tensors start a chunk (keeps alignment)
    for (int64_t off = 0; off < N; off += kChunk) {
      const int64_t len = std::min<int64_t>(kChunk, N - off);
      seg_start.push_back(off);
      seg_tensor.push_back(static_cast<int32_t>(i));
      seg_len.push_back(static_cast<int32_t>(len));
      fill += len;
      nseg_cur += 1;
      if (fill >= kChunk || nseg_cur >= kMaxSegsPerChunk) close_chunk();
    }
  }
  close_chunk();
  tensor_seg.push_back(static_cast<int32_t>(seg_start.size()));
  TORCH_CHECK(seg_start.size() < (size_t(1) << 31), "atax (CUDA): too many chunks");
  const int64_t S = static_cast<int64_t>(seg_start.size());
  const int64_t C = static_cast<int64_t>(chunk_seg.size()) - 1;

  // ---- lay out one byte buffer (16-byte aligned sub-arrays)
  size_t off = 0;
  const size_t o_ptrs = off;   off = align_up(off + sizeof(int64_t) * L * n, 16);
  const size_t o_start = off;  off = align_up(off + sizeof(int64_t) * S, 16);
  const size_t o_tens = off;   off = align_up(off + sizeof(int32_t) * S, 16);
  const size_t o_len = off;    off = align_up(off + sizeof(int32_t) * S, 16);
  const size_t o_chunk = off;  off = align_up(off + sizeof(int32_t) * (C + 1), 16);
  const size_t o_tseg = off;   off = align_up(off + sizeof(int32_t) * (n + 1), 16);
  const size_t o_dt = off;     off = align_up(off + sizeof(int8_t) * L * n, 16);
  const size_t bytes = std::max<size_t>(off, 16);

  auto e = std::make_shared<TableEntry>();
  uint8_t* host = nullptr;
  if (capturing) {
    c10::cuda::CUDAStreamCaptureModeGuard g{cudaStreamCaptureModeRelaxed};
    void* p = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocDefault));
    e->leaked_host = p;
    host = static_cast<uint8_t*>(p);
    e->permanent = true;
  } else {
    e->host_buf = at::empty({static_cast<int64_t>(bytes)},
                            at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    host = e->host_buf.data_ptr<uint8_t>();
  }
  std::memset(host, 0, bytes);
  {
    auto* ptrs = reinterpret_cast<int64_t*>(host + o_ptrs);
    auto* dts = reinterpret_cast<int8_t*>(host + o_dt);
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t i = 0; i < n; ++i) {
        ptrs[l * n + i] = reinterpret_cast<int64_t>(lists[l][i].data_ptr());
        dts[l * n + i] = dtype_code(lists[l][i]);
      }
    }
    if (S > 0) {
      std::memcpy(host + o_start, seg_start.data(), sizeof(int64_t) * S);
      std::memcpy(host + o_tens, seg_tensor.data(), sizeof(int32_t) * S);
      std::memcpy(host + o_len, seg_len.data(), sizeof(int32_t) * S);
    }
    std::memcpy(host + o_chunk, chunk_seg.data(), sizeof(int32_t) * (C + 1));
    std::memcpy(host + o_tseg, tensor_seg.data(), sizeof(int32_t) * (n + 1));
  }

  e->device_buf = at::empty({static_cast<int64_t>(bytes)},
                            at::TensorOptions().dtype(at::kByte).device(device));
  uint8_t* dev = e->device_buf.data_ptr<uint8_t>();
  if (capturing) {
    // Captured as a memcpy node (host buffer is pinned and lives forever).
    C10_CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, stream.stream()));
  } else {
    // One non-blocking copy from pinned memory on the current stream (torch tracks the pinned block).
    e->device_buf.copy_(e->host_buf, /*non_blocking=*/true);
    e->ready = std::make_shared<at::cuda::CUDAEvent>();
    e->ready->record(stream);
  }
  e->upload_stream = stream.stream();

  TableView& v = e->view;
  v.ptrs = reinterpret_cast<const int64_t*>(dev + o_ptrs);
  v.seg_start = reinterpret_cast<const int64_t*>(dev + o_start);
  v.seg_tensor = reinterpret_cast<const int32_t*>(dev + o_tens);
  v.seg_len = reinterpret_cast<const int32_t*>(dev + o_len);
  v.chunk_seg = reinterpret_cast<const int32_t*>(dev + o_chunk);
  v.tensor_seg = reinterpret_cast<const int32_t*>(dev + o_tseg);
  v.dtypes = reinterpret_cast<const int8_t*>(dev + o_dt);
  v.n = static_cast<int32_t>(n);
  v.L = static_cast<int32_t>(L);
  v.num_segs = static_cast<int32_t>(S);
  v.num_chunks = static_cast<int32_t>(C);
  e->total_numel = total;

  if (capturing) {
    captured_tables().push_back(e);
  } else {
    cache.insert(key, e);
  }
  return e;
}

// Contiguous version of t (t itself when already contiguous).
inline at::Tensor as_contig(const at::Tensor& t) {
  return t.is_contiguous() ? t : t.contiguous();
}

}  // namespace cuda
}  // namespace atax
