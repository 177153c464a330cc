// tvmq_run: run a tvmq bundle on a board with only the TVM runtime (no Python).
//
//   tvmq_run model.so in0.npy [in1.npy ...] [-o out_prefix] [--no-verify]
//
// Inputs are .npy files in the order of manifest.json's "inputs"; output i is written to
// <out_prefix><i>.npy. Before loading model.so, its sha256 is checked against manifest.json
// beside it (--no-verify skips that, for development), and every input is checked against the
// manifest's name, dtype and shape before anything runs: a malformed or mismatched .npy is one
// "error:" line saying what is wrong, exit code 2. Only tvm-ffi's headers are needed; link
// against libtvm_ffi.so and libtvm_runtime.so (the runtime registers the VM).
// tvmq.crossrt.build_runner does it for a target's cross compiler; by hand:
//   g++ -std=c++17 -O2 tvmq_run.cc -I<tvm_ffi>/include -I<tvm_ffi>/3rdparty/dlpack/include \
//       -L<libs> -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN' -o tvmq_run
// Built with -DTVMQ_NPY_CHECK it is only the .npy reader (no TVM): `tvmq_run FILE...` prints
// "ok SHAPE" or the error line for each file (the fuzz test builds it with sanitizers).
#include <sched.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace npy {

// A .npy header is at most a few hundred bytes; numpy itself refuses headers over 10000 bytes
// unless asked. Anything larger is not an array this runner was meant to read.
constexpr uint32_t kMaxHeader = 1 << 16;

struct Type {
  char kind;  // 'f', 'i', 'u', 'b'
  int bytes;
};

struct Array {
  Type type;
  std::vector<int64_t> shape;
  std::vector<char> data;
};

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += std::to_string(shape[i]) + (shape.size() == 1 ? "," : i + 1 < shape.size() ? ", " : "");
  return s + ")";
}

std::string TypeName(Type t) {
  if (t.kind == 'b') return "bool";
  return std::string(t.kind == 'f' ? "float" : t.kind == 'u' ? "uint" : "int") + std::to_string(t.bytes * 8);
}

[[noreturn]] void Fail(const std::string& path, const std::string& what) { throw std::runtime_error(path + ": " + what); }

// A Python literal inside the header dict: 'string', True/False, or a tuple of integers.
struct HeaderParser {
  const std::string& path;
  const std::string& text;
  size_t pos = 0;

  void Space() {
    while (pos < text.size() && (text[pos] == ' ' || text[pos] == '\t' || text[pos] == '\n' || text[pos] == '\r')) ++pos;
  }
  bool Eat(char c) {
    Space();
    if (pos < text.size() && text[pos] == c) {
      ++pos;
      return true;
    }
    return false;
  }
  void Expect(char c, const char* where) {
    if (!Eat(c)) Fail(path, std::string("malformed header: expected '") + c + "' " + where);
  }
  std::string String() {
    Space();
    if (pos >= text.size() || (text[pos] != '\'' && text[pos] != '"')) Fail(path, "malformed header: expected a quoted string");
    char quote = text[pos++];
    size_t end = text.find(quote, pos);
    if (end == std::string::npos) Fail(path, "malformed header: unterminated string");
    std::string s = text.substr(pos, end - pos);
    pos = end + 1;
    return s;
  }
  bool Bool() {
    Space();
    for (const char* word : {"True", "False"}) {
      size_t n = std::strlen(word);
      if (text.compare(pos, n, word) == 0) {
        pos += n;
        return word[0] == 'T';
      }
    }
    Fail(path, "malformed header: fortran_order must be True or False");
  }
  std::vector<int64_t> Shape() {
    Expect('(', "to open the shape");
    std::vector<int64_t> dims;
    while (!Eat(')')) {
      Space();
      bool negative = Eat('-');
      Space();
      if (pos >= text.size() || text[pos] < '0' || text[pos] > '9')
        Fail(path, "malformed header: the shape must be a tuple of integers");
      int64_t v = 0;
      while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') {
        if (v > (INT64_MAX - 9) / 10) Fail(path, "shape has a dimension too large to address");
        v = v * 10 + (text[pos++] - '0');
      }
      if (negative) {
        std::string so_far;
        for (int64_t d : dims) so_far += std::to_string(d) + ", ";
        Fail(path, "shape (" + so_far + "-" + std::to_string(v) + ", ...) has a negative dimension");
      }
      if (dims.size() >= 32) Fail(path, "shape has more than 32 dimensions");
      dims.push_back(v);
      if (!Eat(',')) {
        Expect(')', "to close the shape");
        break;
      }
    }
    return dims;
  }
};

Type ParseDescr(const std::string& path, const std::string& d) {
  if (d.size() < 3 || d.size() > 4) Fail(path, "unsupported dtype '" + d + "' (numeric arrays only)");
  char order = d[0], kind = d[1];
  if (order == '>') Fail(path, "dtype '" + d + "' is big-endian; save it little-endian: a.astype(a.dtype.newbyteorder('<'))");
  if (order != '<' && order != '|' && order != '=') Fail(path, "unsupported byte order in dtype '" + d + "'");
  int bytes = 0;
  for (size_t i = 2; i < d.size(); ++i) {
    if (d[i] < '0' || d[i] > '9') Fail(path, "unsupported dtype '" + d + "'");
    bytes = bytes * 10 + (d[i] - '0');
  }
  bool ok = (kind == 'f' && (bytes == 2 || bytes == 4 || bytes == 8)) ||
            ((kind == 'i' || kind == 'u') && (bytes == 1 || bytes == 2 || bytes == 4 || bytes == 8)) ||
            (kind == 'b' && bytes == 1);
  if (!ok) Fail(path, "unsupported dtype '" + d + "' (float16/32/64, int/uint 8-64 or bool)");
  if (order == '|' && bytes != 1) Fail(path, "dtype '" + d + "' has no byte order but " + std::to_string(bytes) + "-byte items");
  return Type{kind, bytes};
}

// Reads a .npy file, checking everything a hand-made or damaged file can get wrong, before
// allocating anything the file's header asks for.
Array Read(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) Fail(path, "cannot open the file");
  std::streamoff size = f.tellg();
  f.seekg(0);
  unsigned char pre[12];
  if (size < 10 || !f.read(reinterpret_cast<char*>(pre), 10)) Fail(path, "too short to be a .npy file");
  if (std::memcmp(pre, "\x93NUMPY", 6) != 0) Fail(path, "not a .npy file (no \\x93NUMPY magic); save it with numpy.save");
  int major = pre[6];
  if (major < 1 || major > 3) Fail(path, ".npy format version " + std::to_string(major) + " is not supported (1-3)");
  uint32_t header_len;
  std::streamoff offset;
  if (major == 1) {
    header_len = pre[8] | (pre[9] << 8);
    offset = 10;
  } else {
    if (size < 12 || !f.read(reinterpret_cast<char*>(pre + 10), 2)) Fail(path, "too short to be a .npy file");
    header_len = pre[8] | (pre[9] << 8) | (pre[10] << 16) | (static_cast<uint32_t>(pre[11]) << 24);
    offset = 12;
  }
  if (header_len > kMaxHeader) Fail(path, "header length " + std::to_string(header_len) + " is over the limit of " + std::to_string(kMaxHeader) + " bytes");
  if (static_cast<std::streamoff>(header_len) > size - offset) Fail(path, "truncated: the header runs past the end of the file");
  std::string header(header_len, '\0');
  if (header_len && !f.read(&header[0], header_len)) Fail(path, "cannot read the header");
  for (char c : header)
    if (static_cast<unsigned char>(c) >= 0x80 || (c < 0x20 && c != '\n' && c != '\t' && c != '\r')) Fail(path, "malformed header: not printable text");

  HeaderParser p{path, header};
  bool have_descr = false, have_order = false, have_shape = false, fortran = false;
  Array a{};
  p.Expect('{', "at the start of the header");
  while (!p.Eat('}')) {
    std::string key = p.String();
    p.Expect(':', "after a key");
    if (key == "descr" && !have_descr) {
      a.type = ParseDescr(path, p.String());
      have_descr = true;
    } else if (key == "fortran_order" && !have_order) {
      fortran = p.Bool();
      have_order = true;
    } else if (key == "shape" && !have_shape) {
      a.shape = p.Shape();
      have_shape = true;
    } else {
      Fail(path, "malformed header: unexpected or repeated key '" + key + "'");
    }
    if (!p.Eat(',')) {
      p.Expect('}', "to close the header");
      break;
    }
  }
  p.Space();
  if (p.pos != header.size()) Fail(path, "malformed header: text after the closing '}'");
  if (!have_descr || !have_order || !have_shape) Fail(path, "malformed header: it needs 'descr', 'fortran_order' and 'shape'");
  if (fortran) Fail(path, "Fortran-ordered arrays are not supported; save np.ascontiguousarray(a)");

  uint64_t count = 1;
  for (int64_t d : a.shape) {
    if (d != 0 && count > UINT64_MAX / static_cast<uint64_t>(d)) Fail(path, "shape " + ShapeText(a.shape) + " overflows");
    count *= static_cast<uint64_t>(d);
  }
  uint64_t avail = static_cast<uint64_t>(size - offset - header_len);
  if (count > avail / static_cast<uint64_t>(a.type.bytes) || count * a.type.bytes != avail) {
    std::string need = count > UINT64_MAX / static_cast<uint64_t>(a.type.bytes) ? "more than 2^64" : std::to_string(count * a.type.bytes);
    Fail(path, "shape " + ShapeText(a.shape) + " of " + TypeName(a.type) + " needs " + need + " data bytes, the file has " +
                   std::to_string(avail) + (count * a.type.bytes > avail ? " (truncated)" : " (trailing bytes)"));
  }
  a.data.resize(static_cast<size_t>(avail));
  if (avail && !f.read(a.data.data(), static_cast<std::streamsize>(avail))) Fail(path, "cannot read the data");
  return a;
}

}  // namespace npy

#ifdef TVMQ_NPY_CHECK
int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    try {
      npy::Array a = npy::Read(argv[i]);
      std::printf("ok %s %s\n", npy::TypeName(a.type).c_str(), npy::ShapeText(a.shape).c_str());
    } catch (const std::exception& e) {
      std::printf("error: %s\n", e.what());
    }
  }
  return 0;
}
#else

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

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

std::string Descr(DLDataType t) {
  char kind = t.code == kDLFloat ? 'f' : t.code == kDLUInt ? 'u' : t.code == kDLBool ? 'b' : 'i';
  int bytes = t.bits / 8;
  return std::string(bytes == 1 ? "|" : "<") + kind + std::to_string(bytes);
}

DLDataType ToDL(npy::Type t) {
  uint8_t code = t.kind == 'f' ? kDLFloat : t.kind == 'u' ? kDLUInt : t.kind == 'b' ? kDLBool : kDLInt;
  return DLDataType{code, static_cast<uint8_t>(t.bytes * 8), 1};
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

// SHA-256 (FIPS 180-4), to check model.so against the manifest before the loader runs it.
std::string Sha256File(const std::string& path) {
  static const uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
      0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
      0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
      0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
      0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
      0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
      0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
      0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  auto block = [&](const unsigned char* p) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) w[i] = (uint32_t(p[4 * i]) << 24) | (p[4 * i + 1] << 16) | (p[4 * i + 2] << 8) | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
  };
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<unsigned char> buf(1 << 16);
  uint64_t total = 0;
  size_t have = 0;
  while (in) {
    in.read(reinterpret_cast<char*>(buf.data() + have), static_cast<std::streamsize>(buf.size() - have));
    size_t got = static_cast<size_t>(in.gcount());
    total += got;
    have += got;
    size_t whole = have / 64 * 64;
    for (size_t i = 0; i < whole; i += 64) block(buf.data() + i);
    std::memmove(buf.data(), buf.data() + whole, have - whole);
    have -= whole;
  }
  unsigned char tail[128] = {0};
  std::memcpy(tail, buf.data(), have);
  tail[have] = 0x80;
  size_t n = have + 1 + 8 <= 64 ? 64 : 128;
  uint64_t bits = total * 8;
  for (int i = 0; i < 8; ++i) tail[n - 1 - i] = static_cast<unsigned char>(bits >> (8 * i));
  for (size_t i = 0; i < n; i += 64) block(tail + i);
  char hex[65];
  for (int i = 0; i < 8; ++i) std::snprintf(hex + 8 * i, 9, "%08x", h[i]);
  return std::string(hex, 64);
}

// Just enough JSON for manifest.json: objects, arrays, strings (with escapes), numbers, literals.
struct Json {
  enum Kind { kNull, kBool, kNumber, kString, kArray, kObject } kind = kNull;
  double number = 0;
  std::string text;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> fields;

  const Json* Get(const std::string& key) const {
    for (const auto& kv : fields)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
};

struct JsonParser {
  const std::string& s;
  size_t pos = 0;

  [[noreturn]] void Bad() { throw std::runtime_error("manifest.json is not valid JSON (at byte " + std::to_string(pos) + ")"); }
  void Space() {
    while (pos < s.size() && std::strchr(" \t\r\n", s[pos]) && s[pos]) ++pos;
  }
  std::string String() {
    if (s[pos] != '"') Bad();
    std::string out;
    for (++pos; pos < s.size() && s[pos] != '"'; ++pos) {
      if (s[pos] == '\\' && ++pos < s.size()) {
        char c = s[pos];
        if (c == 'u') {  // manifest strings are ASCII; keep the escape's code point if it is
          if (pos + 4 >= s.size()) Bad();
          out += static_cast<char>(std::strtol(s.substr(pos + 1, 4).c_str(), nullptr, 16) & 0x7f);
          pos += 4;
        } else {
          out += c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c == 'b' ? '\b' : c == 'f' ? '\f' : c;
        }
      } else {
        out += s[pos];
      }
    }
    if (pos >= s.size()) Bad();
    ++pos;
    return out;
  }
  Json Value(int depth = 0) {
    if (depth > 64) Bad();
    Space();
    if (pos >= s.size()) Bad();
    Json v;
    char c = s[pos];
    if (c == '{' || c == '[') {
      v.kind = c == '{' ? Json::kObject : Json::kArray;
      ++pos;
      Space();
      if (pos < s.size() && s[pos] == (c == '{' ? '}' : ']')) {
        ++pos;
        return v;
      }
      while (true) {
        Space();
        if (v.kind == Json::kObject) {
          if (pos >= s.size()) Bad();
          std::string key = String();
          Space();
          if (pos >= s.size() || s[pos++] != ':') Bad();
          v.fields.emplace_back(key, Value(depth + 1));
        } else {
          v.items.push_back(Value(depth + 1));
        }
        Space();
        if (pos >= s.size()) Bad();
        if (s[pos] == ',') {
          ++pos;
          continue;
        }
        if (s[pos++] != (c == '{' ? '}' : ']')) Bad();
        return v;
      }
    }
    if (c == '"') {
      v.kind = Json::kString;
      v.text = String();
      return v;
    }
    for (const char* word : {"true", "false", "null"}) {
      if (s.compare(pos, std::strlen(word), word) == 0) {
        pos += std::strlen(word);
        v.kind = word[0] == 'n' ? Json::kNull : Json::kBool;
        v.number = word[0] == 't';
        return v;
      }
    }
    char* end = nullptr;
    v.kind = Json::kNumber;
    v.number = std::strtod(s.c_str() + pos, &end);
    if (end == s.c_str() + pos) Bad();
    pos = static_cast<size_t>(end - s.c_str());
    return v;
  }
};

struct InputSpec {
  std::string name, dtype;
  std::vector<int64_t> shape;     // -1 where the dimension is dynamic
  std::vector<std::string> dims;  // the dynamic dimension's name there, else ""
};

struct DimRange {
  int64_t lo, hi, step;
};

// One value of main's shape argument (stepped dynamic dimensions): input `input`'s size on `axis` / `step`.
struct ShapeArg {
  size_t input;
  int64_t axis, step;
};

// Why `got` does not fit `spec` (dynamic dimensions inside their ranges, one size per name across
// the inputs, collected in `sizes`); empty when it fits.
std::string ShapeProblem(const std::vector<int64_t>& got, const InputSpec& spec, const std::map<std::string, DimRange>& ranges,
                         std::map<std::string, int64_t>* sizes) {
  std::string expected = "(";
  for (size_t i = 0; i < spec.shape.size(); ++i)
    expected += (spec.dims[i].empty() ? std::to_string(spec.shape[i]) : spec.dims[i]) + (i + 1 < spec.shape.size() ? ", " : "");
  expected += spec.shape.size() == 1 ? ",)" : ")";
  std::string plain = "shape " + npy::ShapeText(got) + ", but the model's input '" + spec.name + "' is " + expected;
  if (got.size() != spec.shape.size()) return plain;
  for (size_t i = 0; i < got.size(); ++i) {
    if (spec.dims[i].empty()) {
      if (got[i] != spec.shape[i]) return plain;
      continue;
    }
    const std::string& name = spec.dims[i];
    auto range = ranges.find(name);
    if (range != ranges.end() &&
        (got[i] < range->second.lo || got[i] > range->second.hi || got[i] % range->second.step != 0))
      return plain + " with " + name + " in " + std::to_string(range->second.lo) + ".." + std::to_string(range->second.hi) +
             (range->second.step > 1 ? ", multiples of " + std::to_string(range->second.step) : "") +
             " (the range it was compiled for; recompile with a wider --dim " + name + "=..)";
    auto seen = sizes->emplace(name, got[i]).first;
    if (seen->second != got[i]) return plain + " (" + name + " is " + std::to_string(seen->second) + " in another input)";
  }
  return "";
}

std::string Dirname(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash ? slash : 1);
}

std::string Basename(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// The manifest beside the library: its inputs, and (unless verify is off) the library's checksum.
std::vector<InputSpec> CheckManifest(const std::string& lib, bool verify, std::map<std::string, DimRange>* ranges,
                                     std::vector<ShapeArg>* shape_args) {
  std::string path = Dirname(lib) + "/manifest.json";
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    if (verify) throw std::runtime_error("no manifest.json beside " + lib + ": cannot check the library before loading it; "
                                         "copy the whole bundle folder, or pass --no-verify to run it unchecked");
    return {};
  }
  std::stringstream text;
  text << f.rdbuf();
  std::string s = text.str();
  JsonParser parser{s};
  Json m = parser.Value();
  if (m.kind != Json::kObject) throw std::runtime_error(path + " is not a tvmq manifest");
  if (verify) {
    const Json* files = m.Get("files");
    const Json* sum = files ? files->Get(Basename(lib)) : nullptr;
    if (!sum || sum->kind != Json::kString)
      throw std::runtime_error(path + " has no checksum for " + Basename(lib) + "; recompile, or pass --no-verify");
    if (Sha256File(lib) != sum->text)
      throw std::runtime_error(lib + " does not match its sha256 in manifest.json (altered or truncated copy); "
                               "copy the bundle again, or pass --no-verify to run it anyway");
  }
  std::vector<InputSpec> specs;
  if (const Json* dims = m.Get("dims")) {
    for (const auto& kv : dims->fields) {
      const auto& v = kv.second.items;
      if (kv.second.kind != Json::kArray || v.size() < 2 || v.size() > 3) throw std::runtime_error(path + ": malformed dims entry");
      (*ranges)[kv.first] = DimRange{static_cast<int64_t>(v[0].number), static_cast<int64_t>(v[1].number),
                                     v.size() == 3 ? static_cast<int64_t>(v[2].number) : 1};
    }
  }
  const Json* inputs = m.Get("inputs");
  if (!inputs || inputs->kind != Json::kArray) return specs;
  for (const Json& in : inputs->items) {
    const Json *name = in.Get("name"), *dtype = in.Get("dtype"), *shape = in.Get("shape");
    if (!name || !dtype || !shape || shape->kind != Json::kArray) throw std::runtime_error(path + ": malformed inputs entry");
    InputSpec spec{name->text, dtype->text, {}, {}};
    for (const Json& d : shape->items) {
      bool named = d.kind == Json::kString;  // a dynamic dimension
      spec.shape.push_back(named ? -1 : static_cast<int64_t>(d.number));
      spec.dims.push_back(named ? d.text : "");
    }
    specs.push_back(spec);
  }
  if (const Json* args = m.Get("shape_args")) {
    for (const Json& a : args->items) {
      const Json *input = a.Get("input"), *axis = a.Get("axis"), *step = a.Get("step");
      if (!input || !axis || !step) throw std::runtime_error(path + ": malformed shape_args entry");
      size_t index = 0;
      while (index < specs.size() && specs[index].name != input->text) ++index;
      if (index == specs.size()) throw std::runtime_error(path + ": shape_args names an unknown input");
      shape_args->push_back(ShapeArg{index, static_cast<int64_t>(axis->number), static_cast<int64_t>(step->number)});
    }
  }
  return specs;
}

}  // namespace

int main(int argc, char** argv) {
  DefaultThreads();
  std::vector<std::string> inputs;
  std::string lib, prefix = "output";
  bool verify = true;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-o" && i + 1 < argc) {
      prefix = argv[++i];
    } else if (a == "--no-verify") {
      verify = false;
    } else if (lib.empty()) {
      lib = a;
    } else {
      inputs.push_back(a);
    }
  }
  if (lib.empty() || inputs.empty()) {
    std::fprintf(stderr, "usage: %s model.so in0.npy [in1.npy ...] [-o out_prefix] [--no-verify]\n", argv[0]);
    return 2;
  }
  std::vector<npy::Array> arrays;
  std::vector<ShapeArg> shape_args;
  try {
    // Everything the inputs can get wrong is found before the library is loaded or run.
    std::map<std::string, DimRange> ranges;
    std::map<std::string, int64_t> sizes;
    std::vector<InputSpec> specs = CheckManifest(lib, verify, &ranges, &shape_args);
    if (!specs.empty() && specs.size() != inputs.size()) {
      std::string names;
      for (const auto& s : specs) names += (names.empty() ? "" : ", ") + s.name;
      throw std::runtime_error("the model takes " + std::to_string(specs.size()) + " input(s) (" + names + "), " +
                               std::to_string(inputs.size()) + " given");
    }
    for (size_t i = 0; i < inputs.size(); ++i) {
      arrays.push_back(npy::Read(inputs[i]));
      if (i < specs.size()) {
        const npy::Array& a = arrays.back();
        if (npy::TypeName(a.type) != specs[i].dtype)
          throw std::runtime_error(inputs[i] + ": dtype " + npy::TypeName(a.type) + ", but the model's input '" + specs[i].name +
                                   "' is " + specs[i].dtype);
        std::string problem = ShapeProblem(a.shape, specs[i], ranges, &sizes);
        if (!problem.empty()) throw std::runtime_error(inputs[i] + ": " + problem);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  try {
    Module mod = Module::LoadFromFile(lib);
    Module vm = mod->GetFunction("vm_load_executable").value()().cast<Module>();
    DLDevice cpu{kDLCPU, 0};
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    Function main_fn = vm->GetFunction("main").value();
    std::vector<Any> args;
    for (npy::Array& a : arrays) {
      Tensor t = Tensor::FromNDAlloc(AlignedCPUAlloc(), tvm::ffi::ShapeView(a.shape.data(), a.shape.size()), ToDL(a.type), cpu);
      std::memcpy(t.GetDLTensorPtr()->data, a.data.data(), a.data.size());
      args.push_back(t);
    }
    if (!shape_args.empty()) {  // stepped dynamic dimensions: their size / step, after the inputs
      std::vector<int64_t> blocks;
      for (const ShapeArg& a : shape_args) blocks.push_back(arrays[a.input].shape[a.axis] / a.step);
      args.push_back(tvm::ffi::Shape(blocks));
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

#endif  // TVMQ_NPY_CHECK
