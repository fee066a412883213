// Record and replay of CUDA launches (module mlx_flash._cuda_host).
//
// A decode call's GPU work is one kernel of ~50 us, but building its graph
// through the Python path (validation, plan lookups, mx.custom_function,
// the kernel call) costs 15-50 us of host time, and queued calls run at
// max(host, GPU). The Python path stays the one that decides everything: the
// first call of a kind runs it while mlx_flash/backends/cuda_host.py notes
// each kernel launch, and `record` below reads the graph it built (the kernel
// nodes, the stop_gradient and CustomTransforms nodes of mx.custom_function)
// into a Plan, under a key of everything the Python path read (array types,
// shapes and dtypes, option values and types, the stream or default device
// and stream). A later call with the same key gets the same graph built in
// C++: the same nodes with the Python path's own primitives (kernel name,
// source and launch shape; the custom function's Python forward and vjp) over
// the same inputs (the caller's arrays, the same mx::contiguous nodes, the
// very constant arrays the Python path made, the next ticket-pool region).
// Same kernels, same inputs, same transforms: bit-identical results.
//
// NB_DOMAIN mlx (CMakeLists.txt) shares MLX's nanobind type registry, so
// mx.array, mx.Stream and mx.Device cross the boundary as themselves.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "mlx/array.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"
#include "mlx/transforms.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

// A Python reference that may outlive the interpreter inside an MLX graph
// (a ticket pool's list, a test's stand-in kernel, held by a replayed node
// kept to the end): dropped only while Python runs.
struct PyRef {
  PyObject* obj = nullptr;
  explicit PyRef(nb::handle h) : obj(h.ptr()) { Py_XINCREF(obj); }
  PyRef(const PyRef&) = delete;
  PyRef& operator=(const PyRef&) = delete;
  ~PyRef() {
    if (obj && Py_IsInitialized()) {
      nb::gil_scoped_acquire gil;
      Py_DECREF(obj);
    }
  }
  nb::handle handle() const { return nb::handle(obj); }
};

// ---------------------------------------------------------------------------
// Call keys: a byte string of every value the Python path's decisions read.

PyTypeObject* array_type() {
  static PyTypeObject* type = (PyTypeObject*)nb::type<mx::array>().ptr();
  return type;
}

bool is_array(nb::handle h) { return Py_TYPE(h.ptr()) == array_type(); }

const mx::array& as_array(nb::handle h) { return *nb::inst_ptr<mx::array>(h); }

struct Key {
  std::string bytes;
  bool ok = true;

  Key() { bytes.reserve(512); }

  void word(int64_t w) { bytes.append(reinterpret_cast<const char*>(&w), sizeof(w)); }

  // An array slot: its shape and dtype (strides are never read by the Python
  // path: MLX resolves layouts at eval, in both paths alike).
  void array(nb::handle h, bool optional) {
    if (h.is_none() && optional) {
      word(-1);
      return;
    }
    if (!is_array(h)) {
      ok = false;
      return;
    }
    const mx::array& a = as_array(h);
    word(a.ndim());
    for (auto d : a.shape()) word(d);
    word(static_cast<int64_t>(a.dtype().val()) * 64 + a.dtype().size());
  }

  // None or an exact float (an int or a numpy scalar goes the Python way).
  void optional_float(nb::handle h) {
    if (h.is_none()) {
      word(0);
    } else if (PyFloat_CheckExact(h.ptr())) {
      double x = PyFloat_AS_DOUBLE(h.ptr());
      int64_t bits;
      std::memcpy(&bits, &x, sizeof(bits));
      word(1);
      word(bits);
    } else {
      ok = false;
    }
  }

  void boolean(nb::handle h) {
    if (h.ptr() == Py_True) {
      word(1);
    } else if (h.ptr() == Py_False) {
      word(0);
    } else {
      ok = false;
    }
  }

  void exact_int(nb::handle h) {
    int overflow = 0;
    long long x = PyLong_CheckExact(h.ptr()) ? PyLong_AsLongLongAndOverflow(h.ptr(), &overflow) : 0;
    if (!PyLong_CheckExact(h.ptr()) || overflow) {
      ok = false;
      return;
    }
    word(x);
  }

  // None, or an exact tuple of two entries, each None or an exact int
  // (window, block_size).
  void optional_pair(nb::handle h) {
    if (h.is_none()) {
      word(0);
      return;
    }
    if (!PyTuple_CheckExact(h.ptr()) || PyTuple_GET_SIZE(h.ptr()) != 2) {
      ok = false;
      return;
    }
    word(1);
    for (int i = 0; i < 2; ++i) {
      nb::handle x(PyTuple_GET_ITEM(h.ptr(), i));
      if (x.is_none()) {
        word(0);
      } else {
        word(1);
        exact_int(x);
      }
    }
  }

  // The device's default stream (none, e.g. a GPU on a CPU-only MLX: the
  // Python path gives the error).
  void default_stream(const mx::Device& d) {
    try {
      word(mx::default_stream(d).index);
    } catch (const std::exception&) {
      ok = false;
    }
  }

  // stream=: None (the default device, which picks the backend), a Stream or a Device.
  void stream(nb::handle h) {
    if (h.is_none()) {
      auto d = mx::default_device();
      word(0);
      word(static_cast<int64_t>(d.type));
      word(d.index);
      default_stream(d);  // where the Python path's nodes go (a replayed kernel node keeps it)
    } else if (nb::isinstance<mx::Stream>(h)) {
      auto s = nb::cast<mx::Stream>(h);
      word(1);
      word(static_cast<int64_t>(s.device.type));
      word(s.device.index);
      word(s.index);
    } else if (nb::isinstance<mx::Device>(h)) {
      auto d = nb::cast<mx::Device>(h);
      word(2);
      word(static_cast<int64_t>(d.type));
      word(d.index);
      default_stream(d);
    } else if (nb::isinstance<mx::Device::DeviceType>(h)) {  // mx.cpu / mx.gpu
      auto type = nb::cast<mx::Device::DeviceType>(h);
      word(3);
      word(static_cast<int64_t>(type));
      default_stream(mx::Device(type));
    } else {
      ok = false;
    }
  }

  // A (data, scales, biases) triple: an exact tuple or list of three arrays.
  void triple(nb::handle h) {
    PyObject* p = h.ptr();
    bool tuple = PyTuple_CheckExact(p), list = PyList_CheckExact(p);
    if (!(tuple || list) || Py_SIZE(p) != 3) {
      ok = false;
      return;
    }
    word(tuple ? 3 : 4);
    for (int i = 0; i < 3; ++i) array(nb::handle(tuple ? PyTuple_GET_ITEM(p, i) : PyList_GET_ITEM(p, i)), false);
  }
};

// ---------------------------------------------------------------------------
// Records.

// Where a kernel input comes from on a replayed call.
struct Source {
  enum Kind { Primal, ContiguousPrimal, Constant, PoolRegion, LaunchOutput } kind;
  int index = 0;  // primal index, or launch index (LaunchOutput)
  int output = 0;  // output index (LaunchOutput)
  std::optional<mx::array> constant;
};

struct Launch {
  // The Python path's CustomKernel primitive, given to every replayed node:
  // its eval reads only its own state (name, source, launch shape), so the
  // nodes are the Python path's without MLX assembling the kernel source per
  // call. Null: `kernel` builds each node (MLX_FLASH_CUDA_HOST_KERNEL=1, and
  // the Python stand-ins of the tests).
  std::shared_ptr<mx::Primitive> primitive;
  mx::fast::CustomKernelFunction kernel;
  std::vector<Source> inputs;
  std::vector<mx::Shape> output_shapes;
  std::vector<mx::Dtype> output_dtypes;
  std::tuple<int, int, int> grid, threadgroup;
  std::vector<std::pair<std::string, mx::fast::TemplateArg>> template_args;
  std::optional<float> init_value;
  mx::StreamOrDevice stream;
};

// The decode ticket pool of backends/cuda.py: the Python list
// [array, region views, calls made]; a replayed call takes the next region
// exactly as _ticket_region does (the count lives in the list, shared with
// the Python path).
struct TicketPool {
  std::shared_ptr<PyRef> list;
  std::shared_ptr<std::vector<mx::array>> regions;  // the list's views (made once with the pool, never changed)

  mx::array next() const {
    PyObject* l = list->obj;
    long long calls = PyLong_AsLongLong(PyList_GET_ITEM(l, 2));
    PyObject* next = PyLong_FromLongLong(calls + 1);
    if (next == nullptr) throw nb::python_error();
    PyList_SetItem(l, 2, next);  // steals next, drops the old count
    return (*regions)[calls % static_cast<long long>(regions->size())];
  }
};

// How a recorded call builds its graph: the kernel nodes, then the nodes
// mx.custom_function made around them, stop_gradient of out and lse and
// the CustomTransforms node over (primals, both), each with the Python
// path's own primitive. Their evaluation and transforms read only the
// primitive's state (CustomTransforms: the Python forward and vjp of the
// custom function, without arrays), so every replayed call gets the Python
// path's graph, gradients through its own vjp included.
struct Plan {
  std::vector<Launch> launches;
  int out_launch = 0, out_index = 0, lse_launch = 0, lse_index = 0;
  std::optional<TicketPool> pool;
  std::shared_ptr<mx::Primitive> stop_out, stop_lse, custom_transforms;
  std::vector<mx::Shape> shapes;  // out, lse
  std::vector<mx::Dtype> dtypes;
  // The forward's out and lse have the custom function's shapes and dtypes
  // (checked at record), so an untraced replay may return them themselves.
  bool short_ok = false;
};

struct Record {
  bool replayable = false;  // false: this key always takes the Python path
  std::vector<int> primal_slots;  // primal j = the call's array slot primal_slots[j]
  std::shared_ptr<Plan> plan;
};

// A constant input a replay takes from elsewhere: launch `launch`'s input `input` is `array`.
struct ConstantOverride {
  int launch = -1, input = -1;
  const mx::array* array = nullptr;
};

std::vector<mx::array> run_launches(const Plan& r, const std::vector<mx::array>& primals,
                                    const ConstantOverride& swap = {}) {
  std::vector<std::vector<mx::array>> results;
  results.reserve(r.launches.size());
  for (size_t li = 0; li < r.launches.size(); ++li) {
    const auto& l = r.launches[li];
    std::vector<mx::array> inputs;
    inputs.reserve(l.inputs.size());
    for (size_t ii = 0; ii < l.inputs.size(); ++ii) {
      const auto& s = l.inputs[ii];
      switch (s.kind) {
        case Source::Primal: inputs.push_back(primals[s.index]); break;
        case Source::ContiguousPrimal: inputs.push_back(mx::contiguous(primals[s.index], false, l.stream)); break;
        case Source::Constant:
          inputs.push_back(static_cast<int>(li) == swap.launch && static_cast<int>(ii) == swap.input ? *swap.array
                                                                                                   : *s.constant);
          break;
        case Source::PoolRegion: inputs.push_back(r.pool->next()); break;
        case Source::LaunchOutput: inputs.push_back(results[s.index][s.output]); break;
      }
    }
    if (l.primitive) {
      results.push_back(mx::array::make_arrays(l.output_shapes, l.output_dtypes, l.primitive, inputs));
    } else {
      results.push_back(l.kernel(inputs, l.output_shapes, l.output_dtypes, l.grid, l.threadgroup, l.template_args,
                                 l.init_value, false, l.stream));
    }
  }
  return {results[r.out_launch][r.out_index], results[r.lse_launch][r.lse_index]};
}

// Whether a replay may skip the custom function's nodes: only where no
// primal is a tracer, i.e. no vjp, jvp, vmap or compile trace is following
// this call's inputs (MLX's own test, `array::is_tracer`: the array was
// made under a transformation that is still running, or the graph is kept).
// Outside every trace nothing can ask the call for a gradient, so the
// stop_gradient and CustomTransforms nodes only cost host time (built,
// evaluated, destroyed: three of a decode call's four nodes); inside one the
// full graph keeps the custom vjp.
bool untraced(const std::vector<mx::array>& primals) {
  for (const auto& a : primals) {
    if (a.is_tracer()) return false;
  }
  return true;
}

// The custom function's outputs (out, lse) of a replayed call.
std::vector<mx::array> replay(const Plan& p, std::vector<mx::array> primals, bool allow_short, size_t& shorts) {
  auto forward = run_launches(p, primals);
  if (allow_short && p.short_ok && untraced(primals)) {
    ++shorts;
    return forward;  // the very arrays stop_gradient and CustomTransforms would pass through
  }
  primals.push_back(mx::array(p.shapes[0], p.dtypes[0], p.stop_out, {std::move(forward[0])}));
  primals.push_back(mx::array(p.shapes[1], p.dtypes[1], p.stop_lse, {std::move(forward[1])}));
  return mx::array::make_arrays(p.shapes, p.dtypes, p.custom_transforms, primals);
}

// Kernel objects, one per distinct creation (the Python path's _kernel cache
// has one per the same arguments).
std::unordered_map<std::string, mx::fast::CustomKernelFunction>& kernels() {
  static auto* map = new std::unordered_map<std::string, mx::fast::CustomKernelFunction>();
  return *map;
}

// A Python callable standing in for a kernel object (tests on machines
// without CUDA: tests/test_cuda_host.py registers fakes that compute with
// MLX ops), called as mx.fast.cuda_kernel's objects are.
mx::fast::CustomKernelFunction python_kernel(nb::handle callable) {
  auto fn = std::make_shared<PyRef>(callable);
  return [fn](const std::vector<mx::array>& inputs, const std::vector<mx::Shape>& shapes,
              const std::vector<mx::Dtype>& dtypes, std::tuple<int, int, int> grid,
              std::tuple<int, int, int> threadgroup,
              std::vector<std::pair<std::string, mx::fast::TemplateArg>> template_args, std::optional<float> init,
              bool, mx::StreamOrDevice stream) {
    nb::gil_scoped_acquire gil;
    nb::list py_shapes, py_template;
    for (const auto& shape : shapes) {
      nb::list dims;
      for (auto d : shape) dims.append(d);
      py_shapes.append(nb::tuple(dims));
    }
    for (const auto& [name, value] : template_args) {
      nb::object v = std::visit([](const auto& x) { return nb::cast(x); }, value);
      py_template.append(nb::make_tuple(name, v));
    }
    nb::object py_stream = nb::none();
    if (auto* s = std::get_if<mx::Stream>(&stream)) py_stream = nb::cast(*s);
    if (auto* d = std::get_if<mx::Device>(&stream)) py_stream = nb::cast(*d);
    nb::dict kw;
    kw["inputs"] = nb::cast(inputs);
    kw["output_shapes"] = py_shapes;
    kw["output_dtypes"] = nb::cast(dtypes);
    kw["grid"] = nb::cast(grid);
    kw["threadgroup"] = nb::cast(threadgroup);
    kw["template"] = template_args.empty() ? nb::object(nb::none()) : nb::object(py_template);
    kw["init_value"] = nb::cast(init);
    kw["stream"] = py_stream;
    return nb::cast<std::vector<mx::array>>(fn->handle()(**kw));
  };
}

mx::fast::CustomKernelFunction kernel_for(nb::handle spec) {
  if (!PyTuple_Check(spec.ptr()) && PyCallable_Check(spec.ptr())) return python_kernel(spec);
  auto [name, input_names, output_names, source, header, row_contiguous, smem] =
      nb::cast<std::tuple<std::string, std::vector<std::string>, std::vector<std::string>, std::string, std::string,
                          bool, int>>(spec);
  std::string key = name + '\0' + source + '\0' + header + '\0' + std::to_string(row_contiguous) + '\0' +
                    std::to_string(smem);
  for (auto& n : input_names) key += '\0' + n;
  key += '\1';
  for (auto& n : output_names) key += '\0' + n;
  auto it = kernels().find(key);
  if (it == kernels().end()) {
    it = kernels()
             .emplace(key, mx::fast::cuda_kernel(name, input_names, output_names, source, header, row_contiguous,
                                                 smem))
             .first;
  }
  return it->second;
}

// Template arguments as mx.fast.cuda_kernel converts them (bool before int).
std::vector<std::pair<std::string, mx::fast::TemplateArg>> template_args(nb::handle t) {
  std::vector<std::pair<std::string, mx::fast::TemplateArg>> out;
  if (t.is_none()) return out;
  for (nb::handle item : t) {
    auto name = nb::cast<std::string>(item[0]);
    nb::object value = item[1];
    if (PyBool_Check(value.ptr())) {
      out.emplace_back(name, nb::cast<bool>(value));
    } else if (PyLong_Check(value.ptr())) {
      out.emplace_back(name, nb::cast<int>(value));
    } else {
      out.emplace_back(name, nb::cast<mx::Dtype>(value));
    }
  }
  return out;
}

mx::StreamOrDevice stream_of(nb::handle h) {
  if (h.is_none()) return std::monostate{};
  if (nb::isinstance<mx::Stream>(h)) return nb::cast<mx::Stream>(h);
  if (nb::isinstance<mx::Device::DeviceType>(h)) return mx::Device(nb::cast<mx::Device::DeviceType>(h));
  return nb::cast<mx::Device>(h);
}

// Why a launch cannot be replayed (empty: it can).
struct Refusal {
  std::string reason;
};

// The index of the array with this id, -1 if none; two (the same array passed
// twice) is refused: replay could not tell which argument to take later.
int find_id(const std::vector<mx::array>& arrays, std::uintptr_t id) {
  int found = -1;
  for (size_t i = 0; i < arrays.size(); ++i) {
    if (arrays[i].id() == id) {
      if (found >= 0) throw Refusal{"one array passed as two arguments"};
      found = static_cast<int>(i);
    }
  }
  return found;
}

// Where the recorded input `a` of a launch came from.
Source classify(const mx::array& a, const std::vector<mx::array>& primals,
                const std::vector<std::vector<mx::array>>& earlier, const std::optional<mx::array>& pool_region,
                const mx::StreamOrDevice& stream) {
  if (int i = find_id(primals, a.id()); i >= 0) return {Source::Primal, i};
  for (size_t l = 0; l < earlier.size(); ++l) {
    if (int o = find_id(earlier[l], a.id()); o >= 0) return {Source::LaunchOutput, static_cast<int>(l), o};
  }
  if (pool_region && pool_region->id() == a.id()) return {Source::PoolRegion};
  if (a.has_primitive() && a.status() == mx::array::Status::unscheduled &&
      std::strcmp(a.primitive().name(), "Contiguous") == 0 && a.inputs().size() == 1) {
    int i = find_id(primals, a.inputs()[0].id());
    if (i >= 0) {
      // Only the node replay would build: same primitive options, same stream.
      auto again = mx::contiguous(primals[i], false, stream);
      if (again.primitive().is_equivalent(a.primitive()) && again.primitive().stream() == a.primitive().stream()) {
        return {Source::ContiguousPrimal, i};
      }
    }
    throw Refusal{"an mx.contiguous input that replay would not rebuild alike"};
  }
  if (a.status() != mx::array::Status::unscheduled && !a.has_primitive()) {
    Source s{Source::Constant};
    s.constant = a;
    return s;
  }
  throw Refusal{std::string("an input computed in the call (") + (a.has_primitive() ? a.primitive().name() : "?") +
                "), not a caller array, a constant or a ticket region"};
}

// A recorded decode call that serves a range of key counts (lo..hi, from
// cuda.decode_key_range): over that range its launches differ only in the int
// parameter block (launch `launch`'s constant input `input`), whose key-count
// slot `index` a replay writes anew. Kept under the call's key with k's and
// v's key counts blanked (family_key); a KV cache one key longer every step
// then replays from C++ at each new length instead of running the Python path
// once a step (validation, plans, mx.custom_function: ~50-120 us).
struct KeyCountFamily {
  std::shared_ptr<Record> record;
  int64_t lo = 0, hi = 0;
  int launch = 0, input = 0, index = 0;
  std::vector<int32_t> values;  // the recorded block
  // The block of the last key count asked for: a model's layers all ask for
  // the same one in a step (the Python path's length_array caches it alike).
  int64_t last = -1;
  std::optional<mx::array> last_block;
};

struct Table {
  std::unordered_map<std::string, std::shared_ptr<Record>> records;
  std::unordered_map<std::string, KeyCountFamily> families;
  std::vector<TicketPool> pools;  // one per stream (the pools hold their lists: their addresses stay theirs)
  std::shared_ptr<PyRef> tuning;  // list of dicts (DECODE_TUNING, cuda_quant.TUNING): replay only while all empty
  std::shared_ptr<PyRef> epoch;   // [int]: cuda_host.SETTINGS_EPOCH, bumped by every change of a module setting
  bool enabled = true;
  bool reuse_primitives = true;  // false: every replay calls mx::fast::cuda_kernel (MLX_FLASH_CUDA_HOST_KERNEL=1)
  bool short_graph = true;  // false: every replay builds the custom function's nodes (MLX_FLASH_CUDA_HOST_SHORT=0)
  size_t hits = 0, misses = 0, shorts = 0, key_count_hits = 0;
};

Table& table() {
  static auto* t = new Table();  // never destroyed: holds Python references
  return *t;
}

// Bounded: a growing cache (one new key per generation step) would otherwise keep
// every old key's record, and what each keeps alive (the custom function's
// Python closures, through its CustomTransforms primitive) for the GC to scan.
constexpr size_t kMaxRecords = 1024;

bool tuning_is_default() {
  auto& t = table();
  if (!t.tuning) return true;
  PyObject* l = t.tuning->obj;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(l); ++i) {
    PyObject* d = PyList_GET_ITEM(l, i);
    if (!PyDict_Check(d) || PyDict_GET_SIZE(d) != 0) return false;
  }
  return true;
}

// The settings generation a key is made under: a call recorded before a module
// setting changed (cuda_fwd_ws's plan knobs, POISON_OUTPUTS, PREFILL, ...) is
// another key after it, so it is recorded anew, never replayed with the old plan.
int64_t settings_epoch() {
  auto& t = table();
  if (!t.epoch || PyList_GET_SIZE(t.epoch->obj) != 1) return 0;
  return PyLong_AsLongLong(PyList_GET_ITEM(t.epoch->obj, 0));
}

int64_t key_word(const std::string& key, size_t word) {
  int64_t w;
  std::memcpy(&w, key.data() + word * sizeof(w), sizeof(w));
  return w;
}

// Where a key holds the key counts of its k and v arrays (axis 2 of
// [B, H, N, D] arrays; an array slot is six words: ndim, four dims, dtype).
// attention() ("A"): q, k, v first, so k's N is word 9 and v's word 15.
// attention_quantized() ("Q"): q, then k's and v's (data, scales, biases)
// triples, each a container word and three arrays: N at words 10, 16, 22
// (k) and 29, 35, 41 (v).
struct KeyCountLayout {
  char kind;
  std::vector<size_t> ranks;   // words that must be 4 (each array's ndim)
  std::vector<size_t> counts;  // words holding a key count
};

const KeyCountLayout* key_count_layout(const std::string& key) {
  static const KeyCountLayout layouts[] = {
      {'A', {0, 6, 12}, {9, 15}},
      {'Q', {0, 7, 13, 19, 26, 32, 38}, {10, 16, 22, 29, 35, 41}},
  };
  constexpr size_t tail = 1 + sizeof(int64_t);  // kind, settings epoch
  if (key.size() < tail) return nullptr;
  for (const auto& l : layouts) {
    if (key[key.size() - tail] != l.kind || key.size() < (l.counts.back() + 1) * sizeof(int64_t) + tail) continue;
    for (size_t w : l.ranks) {
      if (key_word(key, w) != 4) return nullptr;
    }
    return &l;
  }
  return nullptr;
}

// The call's key count: every array's the same, else -1 (the Python path's checks then give their error).
int64_t key_count_of(const std::string& key, const KeyCountLayout& layout) {
  int64_t keys = key_word(key, layout.counts[0]);
  for (size_t w : layout.counts) {
    if (key_word(key, w) != keys) return -1;
  }
  return keys;
}

// The key of the call's key-count family: its key with every key count blanked.
std::string family_key(std::string key, const KeyCountLayout& layout) {
  const int64_t blank = -2;
  for (size_t word : layout.counts) std::memcpy(key.data() + word * sizeof(blank), &blank, sizeof(blank));
  return key;
}

// The replay of a call whose key was not recorded but whose family serves
// its key count; none where no family does or the call is traced (a traced
// call needs the custom function's vjp, whose Python closure holds the
// recorded key count: the Python path serves it).
std::optional<std::vector<mx::array>> key_count_replay(const std::string& key, const std::vector<nb::handle>& slots) {
  auto& t = table();
  const KeyCountLayout* layout = t.short_graph ? key_count_layout(key) : nullptr;
  if (layout == nullptr) return std::nullopt;
  int64_t keys = key_count_of(key, *layout);
  if (keys < 0) return std::nullopt;
  auto it = t.families.find(family_key(key, *layout));
  if (it == t.families.end()) return std::nullopt;
  KeyCountFamily& f = it->second;
  if (keys < f.lo || keys > f.hi) return std::nullopt;
  std::vector<mx::array> primals;
  primals.reserve(f.record->primal_slots.size());
  for (int slot : f.record->primal_slots) primals.push_back(as_array(slots[slot]));
  if (!untraced(primals)) return std::nullopt;
  if (f.last != keys) {
    std::vector<int32_t> values = f.values;
    values[f.index] = static_cast<int32_t>(keys);
    // Written by the host, as length_array's block of the Python path.
    f.last_block = mx::array(values.begin(), mx::Shape{static_cast<int>(values.size())}, mx::int32);
    f.last = keys;
  }
  ++t.key_count_hits;
  return run_launches(*f.record->plan, primals, ConstantOverride{f.launch, f.input, &*f.last_block});
}

// The replay of a recorded call, or the key (bytes) when the Python path must
// run and may be recorded, or None when it must run and is never recorded.
nb::object lookup_and_run(Key& key, const std::vector<nb::handle>& slots, bool return_lse, const char* kind) {
  auto& t = table();
  if (!key.ok || !t.enabled || !tuning_is_default()) return nb::none();
  key.bytes.append(kind);
  key.word(settings_epoch());
  auto it = t.records.find(key.bytes);
  if (it == t.records.end()) {
    if (!t.families.empty()) {
      if (auto outs = key_count_replay(key.bytes, slots)) {
        if (return_lse) return nb::make_tuple(nb::cast(std::move((*outs)[0])), nb::cast(std::move((*outs)[1])));
        return nb::cast(std::move((*outs)[0]));
      }
    }
    ++t.misses;
    return nb::bytes(key.bytes.data(), key.bytes.size());
  }
  const Record& r = *it->second;
  if (!r.replayable) return nb::none();
  ++t.hits;
  std::vector<mx::array> primals;
  primals.reserve(r.primal_slots.size());
  for (int slot : r.primal_slots) primals.push_back(as_array(slots[slot]));
  auto outs = replay(*r.plan, std::move(primals), t.short_graph, t.shorts);
  if (return_lse) return nb::make_tuple(nb::cast(std::move(outs[0])), nb::cast(std::move(outs[1])));
  return nb::cast(std::move(outs[0]));
}

// The pool of this Python list, its region views converted once (1024 of
// them: converting them per record cost 40 us).
TicketPool ticket_pool(nb::handle list) {
  auto& pools = table().pools;
  for (const auto& p : pools) {
    if (p.list->obj == list.ptr()) return p;
  }
  TicketPool tp{std::make_shared<PyRef>(list), std::make_shared<std::vector<mx::array>>()};
  for (nb::handle v : nb::borrow<nb::list>(list)[1]) tp.regions->push_back(nb::cast<mx::array>(v));
  pools.push_back(tp);
  return tp;
}

// The forward's (out, lse) and the custom function's inputs, read off the
// graph of the outputs `mx.custom_function` returned: a CustomTransforms node
// over (primals..., stop_gradient(out), stop_gradient(lse)).
void unwrap_custom_function(const mx::array& out, const mx::array& lse, std::vector<mx::array>& primals,
                            mx::array& forward_out, mx::array& forward_lse, Plan& plan) {
  if (!out.has_primitive() || std::strcmp(out.primitive().name(), "CustomTransforms") != 0 ||
      !lse.has_primitive() || lse.primitive_id() != out.primitive_id() || out.inputs().size() < 2 ||
      out.siblings().size() != 1 || out.status() != mx::array::Status::unscheduled) {
    throw Refusal{"the result is not the two outputs of one custom function"};
  }
  const auto& inputs = out.inputs();
  primals.assign(inputs.begin(), inputs.end() - 2);
  auto forward_result = [](const mx::array& x, std::shared_ptr<mx::Primitive>& stop) {
    if (!x.has_primitive() || std::strcmp(x.primitive().name(), "StopGradient") != 0 || x.inputs().size() != 1) {
      throw Refusal{"a custom-function output that is not stop_gradient(forward result)"};
    }
    stop = x.primitive_ptr();
    return x.inputs()[0];
  };
  forward_out = forward_result(inputs[inputs.size() - 2], plan.stop_out);
  forward_lse = forward_result(inputs[inputs.size() - 1], plan.stop_lse);
  plan.custom_transforms = out.primitive_ptr();
  plan.shapes = {out.shape(), lse.shape()};
  plan.dtypes = {out.dtype(), lse.dtype()};
  plan.short_ok = forward_out.shape() == out.shape() && forward_out.dtype() == out.dtype() &&
                  forward_lse.shape() == lse.shape() && forward_lse.dtype() == lse.dtype();
}

// The family of a recorded call whose launches serve a range of key counts
// (cuda_host.note_key_count: (the int block, its values, the key count's
// slot, lo, hi)). Only a key of a known layout (key_count_layout) whose untraced replay is short
// (key_count_replay replays nothing else) and whose int block is exactly one
// constant input; otherwise the call keeps its own record only.
void add_key_count_family(const std::string& key, const std::shared_ptr<Record>& rec, nb::handle key_count) {
  auto& t = table();
  const KeyCountLayout* layout = key_count_layout(key);
  if (!rec->plan->short_ok || layout == nullptr) return;
  auto [block, values, index, lo, hi] =
      nb::cast<std::tuple<mx::array, std::vector<int32_t>, int, int64_t, int64_t>>(key_count);
  int64_t keys = key_count_of(key, *layout);
  if (index < 0 || index >= static_cast<int>(values.size()) || values[index] != keys || lo > keys || keys > hi ||
      keys < 0) {
    throw std::invalid_argument("note_key_count: the block's key count, the range and the call's k and v disagree");
  }
  KeyCountFamily f{rec, lo, hi};
  f.values = std::move(values);
  f.index = index;
  int found = 0;
  for (size_t li = 0; li < rec->plan->launches.size(); ++li) {
    const auto& inputs = rec->plan->launches[li].inputs;
    for (size_t ii = 0; ii < inputs.size(); ++ii) {
      if (inputs[ii].kind == Source::Constant && inputs[ii].constant->id() == block.id()) {
        f.launch = static_cast<int>(li);
        f.input = static_cast<int>(ii);
        ++found;
      }
    }
  }
  if (found == 1) t.families[family_key(key, *layout)] = std::move(f);
}

// The record of a call the Python path just ran, from what cuda_host.py noted.
//   key        the bytes lookup_and_run returned
//   slots      the call's array slots (arrays or None), in the entry point's order
//   result     (out, lse) as the custom function returned them
//   launches   [(kernel spec, inputs, outputs, template, grid, threadgroup,
//                 output_shapes, output_dtypes, init_value, stream)] in call order
//   pool       (the ticket pool list, the region it gave) or None
// Returns "" when the call is recorded, else why not (the key then always
// takes the Python path).
std::string record(nb::bytes key_bytes, std::vector<nb::object> slots, std::tuple<mx::array, mx::array> result,
                   nb::list launches, nb::object pool, nb::object key_count) {
  auto& t = table();
  if (t.records.size() >= kMaxRecords) {
    t.records.clear();
    t.families.clear();
  }
  std::string key(key_bytes.c_str(), key_bytes.size());
  auto rec = std::make_shared<Record>();
  t.records[key] = rec;  // refused until it is complete
  auto plan = std::make_shared<Plan>();
  try {
    std::vector<mx::array> primals;
    mx::array forward_out(0.0f), forward_lse(0.0f);
    unwrap_custom_function(std::get<0>(result), std::get<1>(result), primals, forward_out, forward_lse, *plan);
    std::vector<mx::array> slot_arrays;  // the caller's arrays (an empty array where a slot is None)
    for (auto& s : slots) slot_arrays.push_back(is_array(s) ? as_array(s) : mx::array(0.0f));
    for (const auto& p : primals) {
      int slot = find_id(slot_arrays, p.id());
      if (slot < 0) throw Refusal{"a custom-function input that is not one of the caller's arrays"};
      rec->primal_slots.push_back(slot);
    }
    for (const auto& p : primals) find_id(primals, p.id());  // refuses an array passed twice
    std::optional<mx::array> pool_region;
    if (!pool.is_none()) {
      pool_region = nb::cast<mx::array>(pool[1]);
      plan->pool = ticket_pool(pool[0]);
    }
    if (launches.size() == 0) throw Refusal{"no kernel launch noted"};
    std::vector<std::vector<mx::array>> outputs;
    for (nb::handle item : launches) {
      auto l = nb::borrow<nb::tuple>(item);
      auto launch_outputs = nb::cast<std::vector<mx::array>>(l[2]);
      std::vector<mx::array> launch_inputs;
      for (nb::handle x : l[1]) launch_inputs.push_back(nb::cast<mx::array>(x));
      Launch launch;
      const mx::array& first = launch_outputs.at(0);
      if (t.reuse_primitives && first.has_primitive() && std::strcmp(first.primitive().name(), "CustomKernel") == 0) {
        // The node mx.fast.cuda_kernel made: its outputs are siblings, its inputs the noted ones.
        for (const auto& o : launch_outputs) {
          if (!o.has_primitive() || o.primitive_id() != first.primitive_id()) {
            throw Refusal{"a launch whose outputs are not one kernel node's"};
          }
        }
        const auto& node_inputs = first.inputs();
        if (node_inputs.size() != launch_inputs.size()) throw Refusal{"a kernel node with other inputs than noted"};
        for (size_t i = 0; i < node_inputs.size(); ++i) {
          if (node_inputs[i].id() != launch_inputs[i].id()) throw Refusal{"a kernel node with other inputs than noted"};
        }
        launch.primitive = first.primitive_ptr();
      } else {
        if (l[0].is_none()) throw Refusal{"a kernel object cuda.py's _kernel did not make"};
        launch.kernel = kernel_for(l[0]);
      }
      launch.stream = stream_of(l[9]);
      launch.template_args = template_args(l[3]);
      launch.grid = nb::cast<std::tuple<int, int, int>>(l[4]);
      launch.threadgroup = nb::cast<std::tuple<int, int, int>>(l[5]);
      for (nb::handle shape : l[6]) {
        mx::Shape s;
        for (nb::handle d : shape) s.push_back(nb::cast<int>(d));
        launch.output_shapes.push_back(std::move(s));
      }
      for (nb::handle d : l[7]) launch.output_dtypes.push_back(nb::cast<mx::Dtype>(d));
      launch.init_value = nb::cast<std::optional<float>>(l[8]);
      for (const auto& x : launch_inputs) {
        launch.inputs.push_back(classify(x, primals, outputs, pool_region, launch.stream));
      }
      outputs.push_back(std::move(launch_outputs));
      plan->launches.push_back(std::move(launch));
    }
    auto find_output = [&](const mx::array& a, int& launch, int& index) {
      for (size_t i = 0; i < outputs.size(); ++i) {
        if (int o = find_id(outputs[i], a.id()); o >= 0) {
          launch = static_cast<int>(i);
          index = o;
          return;
        }
      }
      throw Refusal{"a forward result that is not a noted launch's output"};
    };
    find_output(forward_out, plan->out_launch, plan->out_index);
    find_output(forward_lse, plan->lse_launch, plan->lse_index);
    int pool_uses = 0;
    for (auto& l : plan->launches)
      for (auto& s : l.inputs) pool_uses += s.kind == Source::PoolRegion;
    if (plan->pool && pool_uses != 1) throw Refusal{"the ticket region is not one launch input"};
  } catch (const Refusal& r) {
    return r.reason;
  }
  rec->plan = plan;
  rec->replayable = true;
  if (!key_count.is_none()) add_key_count_family(key, rec, key_count);
  return "";
}

}  // namespace

NB_MODULE(_cuda_host, m) {
  m.doc() = "Record and replay of mlx_flash's CUDA launches (see csrc/cuda_host.cpp)";

  m.def(
      "attention",
      [](nb::handle q, nb::handle k, nb::handle v, nb::handle scale, nb::handle mask, nb::handle causal,
         nb::handle window, nb::handle softcap, nb::handle alibi, nb::handle sinks, nb::handle block_mask,
         nb::handle block_size, nb::handle key_start, nb::handle key_len, nb::handle return_lse,
         nb::handle stream) {
        Key key;
        key.array(q, false);
        key.array(k, false);
        key.array(v, false);
        key.array(mask, true);
        key.array(alibi, true);
        key.array(sinks, true);
        key.array(block_mask, true);
        key.array(key_start, true);
        key.array(key_len, true);
        key.optional_float(scale);
        key.boolean(causal);
        key.optional_pair(window);
        key.optional_float(softcap);
        key.optional_pair(block_size);
        key.boolean(return_lse);
        key.stream(stream);
        return lookup_and_run(key, {q, k, v, mask, alibi, sinks, block_mask, key_start, key_len},
                              return_lse.ptr() == Py_True, "A");
      },
      nb::arg("q").none(), nb::arg("k").none(), nb::arg("v").none(), nb::arg("scale").none(),
      nb::arg("mask").none(), nb::arg("causal").none(), nb::arg("window").none(), nb::arg("softcap").none(),
      nb::arg("alibi_slopes").none(), nb::arg("sinks").none(), nb::arg("block_mask").none(),
      nb::arg("block_size").none(), nb::arg("key_start").none(), nb::arg("key_len").none(),
      nb::arg("return_lse").none(), nb::arg("stream").none(),
      "Replay of a recorded flash_attention call (arguments in the signature's order), or its key (bytes) "
      "when it is not recorded yet, or None when it always takes the Python path.");

  m.def(
      "attention_quantized",
      [](nb::handle q, nb::handle k, nb::handle v, nb::handle bits, nb::handle group_size, nb::handle scale,
         nb::handle mask, nb::handle causal, nb::handle window, nb::handle softcap, nb::handle alibi,
         nb::handle sinks, nb::handle return_lse, nb::handle stream) {
        Key key;
        key.array(q, false);
        key.triple(k);
        key.triple(v);
        if (!key.ok) return nb::object(nb::none());
        key.exact_int(bits);
        key.exact_int(group_size);
        key.array(mask, true);
        key.array(alibi, true);
        key.array(sinks, true);
        key.optional_float(scale);
        key.boolean(causal);
        key.optional_pair(window);
        key.optional_float(softcap);
        key.boolean(return_lse);
        key.stream(stream);
        auto item = [](nb::handle t, int i) { return nb::handle(PySequence_Fast_ITEMS(t.ptr())[i]); };
        return lookup_and_run(key,
                              {q, item(k, 0), item(k, 1), item(k, 2), item(v, 0), item(v, 1), item(v, 2), mask,
                               alibi, sinks},
                              return_lse.ptr() == Py_True, "Q");
      },
      nb::arg("q").none(), nb::arg("k").none(), nb::arg("v").none(), nb::arg("bits").none(),
      nb::arg("group_size").none(), nb::arg("scale").none(), nb::arg("mask").none(), nb::arg("causal").none(),
      nb::arg("window").none(), nb::arg("softcap").none(), nb::arg("alibi_slopes").none(), nb::arg("sinks").none(),
      nb::arg("return_lse").none(), nb::arg("stream").none(),
      "flash_attention_quantized's counterpart of attention() (k and v each a (data, scales, biases) triple).");

  m.def("record", &record, nb::arg("key"), nb::arg("slots"), nb::arg("result"), nb::arg("launches"),
        nb::arg("pool").none(), nb::arg("key_count").none() = nb::none(),
        "Record the Python path's launches of a missed key (see csrc/cuda_host.cpp); returns "
        "'' when recorded, else why not. key_count: None, or (int block, its values, the key count's slot, lo, hi) "
        "of a decode launch that serves key counts lo..hi (cuda_host.note_key_count).");

  m.def(
      "set_tuning",
      [](nb::list dicts) { table().tuning = std::make_shared<PyRef>(dicts); },
      "The tuning dicts (DECODE_TUNING, cuda_quant.TUNING): calls replay only while all are empty.");
  m.def(
      "set_settings_epoch",
      [](nb::list epoch) {
        if (epoch.size() != 1 || !PyLong_Check(epoch[0].ptr())) throw nb::value_error("expected a list of one int");
        table().epoch = std::make_shared<PyRef>(epoch);
      },
      "cuda_host.SETTINGS_EPOCH ([int]): every key holds its value, so a changed setting makes new keys.");
  m.def(
      "set_enabled", [](bool on) { table().enabled = on; }, "Switch replay (and recording) on or off.");
  m.def("enabled", []() { return table().enabled; });
  m.def(
      "set_short_graph", [](bool on) { table().short_graph = on; },
      "Let untraced replays return the kernel's out and lse without the custom function's stop_gradient and "
      "CustomTransforms nodes (default), or build them on every replay.");
  m.def(
      "short_graph_stats",
      []() { return nb::make_tuple(table().shorts, table().short_graph); },
      "(replays returned without the custom function's nodes, the switch).");
  m.def(
      "set_reuse_primitives", [](bool on) { table().reuse_primitives = on; },
      "Replay kernel launches by sharing the Python path's kernel node primitive (default), or through "
      "mx::fast::cuda_kernel per call; applies to records made after.");
  m.def(
      "clear",
      []() {
        table().records.clear();
        table().families.clear();
        table().pools.clear();
      },
      "Forget every record (the kernels stay cached).");
  m.def(
      "stats",
      []() {
        auto& t = table();
        size_t replayable = 0;
        for (auto& [_, r] : t.records) replayable += r->replayable;
        return nb::make_tuple(t.hits, t.misses, t.records.size(), replayable);
      },
      "(hits, misses, records, replayable records).");
  m.def(
      "key_count_stats", []() { return nb::make_tuple(table().key_count_hits, table().families.size()); },
      "(calls replayed at a key count their key was not recorded with, key-count families held).");
}
