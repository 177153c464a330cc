// tvmq_run: run a tvmq bundle on a board with only the TVM runtime (no Python).
//
//   tvmq_run model.so in0.npy [in1.npy ...] -o out_prefix
//
// Inputs are .npy files in the order of manifest.json's "inputs"; output i is written to
// <out_prefix><i>.npy. Only tvm-ffi's headers are needed; link against libtvm_ffi.so and
// libtvm_runtime.so (the runtime registers the VM). tvmq.crossrt.build_runner does it for a
// target's cross compiler; by hand:
//   g++ -std=c++17 -O2 tvmq_run.cc -I<tvm_ffi>/include -I<tvm_ffi>/3rdparty/dlpack/include \
//       -L<libs> -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN' -o tvmq_run
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <sched.h>

#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using tvm::ffi::Any;
using tvm::ffi::Function;
using tvm::ffi::Module;
using tvm::ffi::Tensor;

namespace {

// Generated kernels assume 64-byte aligned tensors (what TVM's own allocator returns).
struct AlignedCPUAlloc {
  void AllocData(DLTensor* t) {
    size_t size = tvm::ffi::GetDataSize(*t);
    if (posix_memalign(&t->data, 64, size ? size : 64) != 0) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

size_t NumBytes(const Tensor& t) { return tvm::ffi::GetDataSize(*t.GetDLTensorPtr()); }

struct Npy {
  DLDataType dtype;
  std::vector<int64_t> shape;
  std::vector<char> data;
};

DLDataType ParseDescr(const std::string& d) {
  // '<f4', '|u1', '|i1', '<i4', '<i8', '<f2'
  if (d.size() < 3) throw std::runtime_error("bad npy dtype " + d);
  char kind = d[1];
  int bytes = std::stoi(d.substr(2));
  uint8_t code = kind == 'f' ? kDLFloat : kind == 'u' ? kDLUInt : kind == 'i' ? kDLInt : kind == 'b' ? kDLBool : 255;
  if (code == 255) throw std::runtime_error("unsupported npy dtype " + d);
  return DLDataType{code, static_cast<uint8_t>(bytes * 8), 1};
}

std::string Descr(DLDataType t) {
  char kind = t.code == kDLFloat ? 'f' : t.code == kDLUInt ? 'u' : t.code == kDLBool ? 'b' : 'i';
  int bytes = t.bits / 8;
  return std::string(bytes == 1 ? "|" : "<") + kind + std::to_string(bytes);
}

Npy ReadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[8];
  f.read(magic, 8);
  if (std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + " is not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t n;
    f.read(reinterpret_cast<char*>(&n), 2);
    header_len = n;
  } else {
    f.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, ' ');
  f.read(&header[0], header_len);
  if (header.find("'fortran_order': True") != std::string::npos)
    throw std::runtime_error(path + ": Fortran-ordered arrays are not supported");
  Npy npy;
  auto d0 = header.find("'descr': '") + 10;
  npy.dtype = ParseDescr(header.substr(d0, header.find('\'', d0) - d0));
  auto s0 = header.find('(', header.find("'shape'")) + 1;
  std::stringstream shape(header.substr(s0, header.find(')', s0) - s0));
  std::string item;
  int64_t count = 1;
  while (std::getline(shape, item, ',')) {
    if (item.find_first_not_of(" ") == std::string::npos) continue;
    npy.shape.push_back(std::stoll(item));
    count *= npy.shape.back();
  }
  npy.data.resize(count * (npy.dtype.bits / 8));
  f.read(npy.data.data(), npy.data.size());
  if (!f) throw std::runtime_error(path + " is truncated");
  return npy;
}

void WriteNpy(const std::string& path, const Tensor& tensor) {
  const DLTensor* t = tensor.GetDLTensorPtr();
  if (t->device.device_type != kDLCPU) throw std::runtime_error("output is not in CPU memory");
  std::string shape = "(";
  for (int i = 0; i < t->ndim; ++i) {
    shape += std::to_string(t->shape[i]) + (t->ndim == 1 ? "," : (i + 1 < t->ndim ? ", " : ""));
  }
  shape += ")";
  std::string header = "{'descr': '" + Descr(t->dtype) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::vector<char> bytes(NumBytes(tensor));
  std::memcpy(bytes.data(), static_cast<const char*>(t->data) + t->byte_offset, bytes.size());
  std::ofstream f(path, std::ios::binary);
  uint16_t n = static_cast<uint16_t>(header.size());
  f.write("\x93NUMPY\x01\x00", 8);
  f.write(reinterpret_cast<const char*>(&n), 2);
  f << header;
  f.write(bytes.data(), bytes.size());
  if (!f) throw std::runtime_error("cannot write " + path);
}

void Collect(const Any& value, std::vector<Tensor>* out) {
  if (auto t = value.as<Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = value.as<tvm::ffi::Array<Any>>()) {
    for (const Any& item : *arr) Collect(item, out);
  } else {
    throw std::runtime_error("unexpected output type");
  }
}

// TVM 0.27 without TVM_NUM_THREADS runs on half the CPUs on x86 and calls
// std::thread::hardware_concurrency() (a sysfs read in glibc, ~6 us) at every parallel kernel
// launch. Default it to the CPUs this process may use (boards have no SMT; on an x86 host with
// SMT, set TVM_NUM_THREADS to the physical cores).
void DefaultThreads() {
  if (std::getenv("TVM_NUM_THREADS") || std::getenv("OMP_NUM_THREADS")) return;
  cpu_set_t cpus;
  int n = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
  setenv("TVM_NUM_THREADS", std::to_string(n > 0 ? n : 1).c_str(), 0);
}

}  // namespace

int main(int argc, char** argv) {
  DefaultThreads();
  std::vector<std::string> inputs;
  std::string lib, prefix = "output";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-o" && i + 1 < argc) {
      prefix = argv[++i];
    } else if (lib.empty()) {
      lib = a;
    } else {
      inputs.push_back(a);
    }
  }
  if (lib.empty() || inputs.empty()) {
    std::fprintf(stderr, "usage: %s model.so in0.npy [in1.npy ...] [-o out_prefix]\n", argv[0]);
    return 2;
  }
  try {
    Module mod = Module::LoadFromFile(lib);
    Module vm = mod->GetFunction("vm_load_executable").value()().cast<Module>();
    DLDevice cpu{kDLCPU, 0};
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    Function main_fn = vm->GetFunction("main").value();
    std::vector<Any> args;
    for (const std::string& path : inputs) {
      Npy npy = ReadNpy(path);
      Tensor t = Tensor::FromNDAlloc(AlignedCPUAlloc(), tvm::ffi::ShapeView(npy.shape.data(), npy.shape.size()),
                                     npy.dtype, cpu);
      std::memcpy(t.GetDLTensorPtr()->data, npy.data.data(), npy.data.size());
      args.push_back(t);
    }
    std::vector<tvm::ffi::AnyView> views(args.begin(), args.end());
    Any result;
    main_fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
    std::vector<Tensor> outputs;
    Collect(result, &outputs);
    for (size_t i = 0; i < outputs.size(); ++i) {
      std::string path = prefix + std::to_string(i) + ".npy";
      WriteNpy(path, outputs[i]);
      std::printf("wrote %s\n", path.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
