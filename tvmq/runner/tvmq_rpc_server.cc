// tvmq_rpc_server: a TVM RPC server for boards without Python.
//
//   tvmq_rpc_server [--host 127.0.0.1] [--port 9090] [--allow CIDR ...] [--key KEY]
//                   [--tracker HOST:PORT] [--workdir DIR] [--once]
//
// Speaks TVM's own RPC protocol (the handshake of tvm.rpc.server, then the runtime's
// rpc.ServerLoop), so `tvm.rpc.connect(host, port, key)` and `tvmq run OUT --rpc host:port`
// reach it like `python -m tvm.exec.rpc_server`; with --tracker it registers with a
// tvm.exec.rpc_tracker under KEY, as the Python server does, so MetaSchedule's RPCRunner
// (`tvmq tune --rpc-tracker`) can measure on it. Built like tvmq_run: only tvm-ffi's headers,
// linked against libtvm_runtime.so and libtvm_ffi.so (tvmq.crossrt.build_rpc_server).
//
// Whoever can connect can upload a shared library and run it as this user: that is what an
// RPC server is for. So it is safe by default: it listens on 127.0.0.1 only (reach it through
// `ssh -L 9090:localhost:9090 board`); a --host that is not loopback prints what it exposes;
// --allow CIDR (repeatable) closes the connection of any other peer before the handshake; and
// every path a client names (upload, download, remove, load_module) must stay inside the work
// folder: absolute paths, ".." and symbolic links are refused. The work folder is private
// (0700) and, unless given with --workdir, removed when the server exits.
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <ftw.h>
#include <pwd.h>
#include <sched.h>
#include <signal.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <tvm/ffi/any.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

using tvm::ffi::Function;
using tvm::ffi::Module;

namespace {

constexpr int32_t kMagic = 0xff271;  // tvm.rpc.base.RPC_MAGIC
constexpr int32_t kSuccess = kMagic;
constexpr int32_t kMismatch = kMagic + 2;

bool RecvAll(int fd, void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n) {
    ssize_t got = recv(fd, p, n, 0);
    if (got <= 0) return false;
    p += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

bool SendAll(int fd, const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n) {
    ssize_t sent = send(fd, p, n, 0);
    if (sent <= 0) return false;
    p += sent;
    n -= static_cast<size_t>(sent);
  }
  return true;
}

bool SendInt(int fd, int32_t v) { return SendAll(fd, &v, sizeof(v)); }

// The tracker speaks length-prefixed JSON (tvm.rpc.base.sendjson / recvjson).
constexpr int32_t kTrackerMagic = 0x2f271;  // tvm.rpc.base.RPC_TRACKER_MAGIC
constexpr int kTrackerSuccess = 0, kTrackerPut = 3, kTrackerUpdateInfo = 5, kTrackerPendingKeys = 7;

bool SendJson(int fd, const std::string& json) {
  return SendInt(fd, static_cast<int32_t>(json.size())) && SendAll(fd, json.data(), json.size());
}

bool RecvJson(int fd, std::string* json) {
  int32_t len = 0;
  if (!RecvAll(fd, &len, 4) || len < 0 || len > (1 << 20)) return false;
  json->assign(static_cast<size_t>(len), '\0');
  return len == 0 || RecvAll(fd, &(*json)[0], static_cast<size_t>(len));
}

std::string Quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

int ConnectTo(const std::string& host, int port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) return -1;
  int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
  if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  return fd;
}

// Registration with a tracker: UPDATE_INFO once, then PUT a fresh match key for each session.
struct Tracker {
  int fd = -1;
  std::string key;
  int port = 0;
  std::string matchkey;
  std::mt19937_64 rng{std::random_device{}()};

  bool Connect(const std::string& address, const std::string& rpc_key, int server_port) {
    size_t colon = address.rfind(':');
    if (colon == std::string::npos) return false;
    fd = ConnectTo(address.substr(0, colon), std::atoi(address.substr(colon + 1).c_str()));
    int32_t magic = 0;
    if (fd < 0 || !SendInt(fd, kTrackerMagic) || !RecvAll(fd, &magic, 4) || magic != kTrackerMagic) return false;
    key = rpc_key;
    port = server_port;
    std::string reply;
    return SendJson(fd, "[" + std::to_string(kTrackerUpdateInfo) + ", {\"key\": " + Quote("server:" + key) +
                            ", \"addr\": [null, " + std::to_string(port) + "]}]") &&
           RecvJson(fd, &reply) && std::atoi(reply.c_str()) == kTrackerSuccess;
  }

  bool Put() {
    matchkey = key + ":" + std::to_string(std::uniform_real_distribution<double>(0, 1)(rng));
    std::string reply;
    return SendJson(fd, "[" + std::to_string(kTrackerPut) + ", " + Quote(key) + ", [" + std::to_string(port) + ", " +
                            Quote(matchkey) + "], null]") &&
           RecvJson(fd, &reply) && std::atoi(reply.c_str()) == kTrackerSuccess;
  }

  // While idle: is our match key still waiting for a client? (False: it was handed out but
  // never used, so offer a new one, as tvm.rpc.server does.)
  bool Pending() {
    std::string reply;
    if (!SendJson(fd, "[" + std::to_string(kTrackerPendingKeys) + "]") || !RecvJson(fd, &reply)) return false;
    return reply.find(Quote(matchkey)) != std::string::npos;
  }
};

// The client sends magic, then "client:EXPECTED [-timeout=N ...]" (the key, or the tracker's
// match key); the server answers success and "server:KEY". Returns false when the connection is not a matching TVM RPC client.
bool Handshake(int fd, const std::string& expected, const std::string& key) {
  int32_t magic = 0, len = 0;
  if (!RecvAll(fd, &magic, 4) || magic != kMagic) return false;
  if (!RecvAll(fd, &len, 4) || len < 0 || len > 4096) return false;
  std::string client(static_cast<size_t>(len), '\0');
  if (len && !RecvAll(fd, &client[0], static_cast<size_t>(len))) return false;
  std::string header = client.substr(0, client.find(' '));
  if (header != "client:" + expected) {
    std::fprintf(stderr, "rejected a client asking for '%s' (expected 'client:%s')\n", header.c_str(), expected.c_str());
    SendInt(fd, kMismatch);
    return false;
  }
  std::string server = "server:" + key;
  return SendInt(fd, kSuccess) && SendInt(fd, static_cast<int32_t>(server.size())) &&
         SendAll(fd, server.data(), server.size());
}

// --allow: IPv4 networks whose peers may connect (none given: any peer that reaches the port).
struct Network {
  uint32_t address = 0, mask = 0;
};

bool ParseNetwork(const std::string& text, Network* net) {
  std::string ip = text;
  int bits = 32;
  size_t slash = text.find('/');
  if (slash != std::string::npos) {
    ip = text.substr(0, slash);
    std::string b = text.substr(slash + 1);
    if (b.empty() || b.size() > 2 || b.find_first_not_of("0123456789") != std::string::npos) return false;
    bits = std::atoi(b.c_str());
    if (bits > 32) return false;
  }
  in_addr addr{};
  if (inet_pton(AF_INET, ip.c_str(), &addr) != 1) return false;
  net->mask = bits == 0 ? 0 : ~uint32_t(0) << (32 - bits);
  net->address = ntohl(addr.s_addr) & net->mask;
  return true;
}

bool PeerAllowed(int fd, const std::vector<Network>& allow, std::string* peer) {
  sockaddr_in addr{};
  socklen_t len = sizeof(addr);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0 || addr.sin_family != AF_INET) return false;
  char text[INET_ADDRSTRLEN] = "?";
  inet_ntop(AF_INET, &addr.sin_addr, text, sizeof(text));
  *peer = text;
  if (allow.empty()) return true;
  uint32_t ip = ntohl(addr.sin_addr.s_addr);
  for (const Network& n : allow)
    if ((ip & n.mask) == n.address) return true;
  return false;
}

// A path a client names, inside the work folder, or an exception the client receives as the
// call's error. Checked component by component so that no symbolic link (planted by an earlier
// upload or already there) can lead outside.
std::string Confine(const std::string& workdir, const std::string& path) {
  if (path.empty()) return workdir;  // the folder itself (MetaSchedule's runner "removes" it after each run)
  if (path[0] == '/') throw std::runtime_error("refused absolute path '" + path + "': paths are relative to the server's work folder");
  std::string full = workdir;
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    std::string part = path.substr(start, end - start);
    if (part == "..") throw std::runtime_error("refused path '" + path + "': '..' leaves the server's work folder");
    if (!part.empty() && part != ".") {
      full += "/" + part;
      struct stat st {};
      if (lstat(full.c_str(), &st) == 0 && S_ISLNK(st.st_mode))
        throw std::runtime_error("refused path '" + path + "': it goes through a symbolic link");
    }
    start = end + 1;
  }
  return full;
}

volatile sig_atomic_t g_stop = 0;
volatile sig_atomic_t g_conn = -1;  // the session's socket: a signal shuts it down to end the session
void OnSignal(int) {
  g_stop = 1;
  if (g_conn >= 0) shutdown(g_conn, SHUT_RDWR);  // async-signal-safe; the session's recv then returns
}

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return remove(path); }

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
  std::string host = "127.0.0.1", key, workdir, tracker_address;
  std::vector<Network> allow;
  int port = 9090;
  bool once = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "error: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--host") host = next();
    else if (a == "--port") port = std::atoi(next().c_str());
    else if (a == "--key") key = next();
    else if (a == "--workdir") workdir = next();
    else if (a == "--tracker") tracker_address = next();
    else if (a == "--once") once = true;
    else if (a == "--allow") {
      std::string value = next();
      Network net;
      if (!ParseNetwork(value, &net)) {
        std::fprintf(stderr, "error: --allow %s is not an IPv4 address or network (e.g. 192.168.1.0/24)\n", value.c_str());
        return 2;
      }
      allow.push_back(net);
    } else {
      std::fprintf(stderr,
                   "usage: %s [--host H] [--port P] [--allow CIDR ...] [--key K] [--tracker H:P] [--workdir DIR] [--once]\n",
                   argv[0]);
      return 2;
    }
  }
  bool own_workdir = workdir.empty();
  if (own_workdir) {
    char tmpl[] = "/tmp/tvmq_rpc_XXXXXX";  // mkdtemp makes it 0700
    if (!mkdtemp(tmpl)) {
      std::perror("error: cannot create a work folder");
      return 2;
    }
    workdir = tmpl;
  } else if (mkdir(workdir.c_str(), 0700) != 0 && errno != EEXIST) {
    std::perror(("error: cannot create the work folder " + workdir).c_str());
    return 2;
  }
  chmod(workdir.c_str(), 0700);
  char* real = realpath(workdir.c_str(), nullptr);
  if (!real) {
    std::perror(("error: cannot resolve the work folder " + workdir).c_str());
    return 2;
  }
  workdir = real;
  std::free(real);
  auto cleanup = [&]() {
    if (own_workdir) nftw(workdir.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS);
  };
  Function::SetGlobal("tvm.rpc.server.workpath",
                      Function::FromTyped([workdir](std::string path) { return Confine(workdir, path); }), true);
  Function::SetGlobal("tvm.rpc.server.load_module", Function::FromTyped([workdir](std::string file) {
                        return Module::LoadFromFile(Confine(workdir, file));
                      }),
                      true);
  Function serve = Function::GetGlobalRequired("rpc.ServerLoop");

  struct sigaction sa {};
  sa.sa_handler = OnSignal;  // no SA_RESTART: a blocked accept/select returns, the loop ends, cleanup runs
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  int listener = socket(AF_INET, SOCK_STREAM, 0);
  int on = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1 ||
      bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(listener, 4) != 0) {
    std::fprintf(stderr, "error: cannot listen on %s:%d\n", host.c_str(), port);
    cleanup();
    return 2;
  }
  if ((ntohl(addr.sin_addr.s_addr) >> 24) != 127) {
    passwd* pw = getpwuid(getuid());
    std::fprintf(stderr,
                 "warning: listening on %s:%d: anyone who can reach this port can upload and run code as user '%s'%s\n",
                 host.c_str(), port, pw ? pw->pw_name : "?",
                 allow.empty() ? "; restrict it with --allow CIDR, or keep the default 127.0.0.1 and use "
                                 "ssh -L 9090:localhost:9090 board"
                               : " (from the --allow networks only)");
  }
  Tracker tracker;
  if (!tracker_address.empty() && !tracker.Connect(tracker_address, key, port)) {
    std::fprintf(stderr, "error: cannot register with the tracker at %s\n", tracker_address.c_str());
    cleanup();
    return 2;
  }
  std::printf("tvmq_rpc_server listening on %s:%d (key '%s', work folder %s)\n", host.c_str(), port, key.c_str(),
              workdir.c_str());
  std::fflush(stdout);
  bool offer = true;  // a fresh match key is due: at start and after each session
  int status = 0;
  while (!g_stop) {
    std::string expected = key;
    if (tracker.fd >= 0) {
      if (offer && !tracker.Put()) {
        std::fprintf(stderr, "error: the tracker dropped the registration\n");
        status = 2;
        break;
      }
      offer = false;
      int idle = 0;
      bool ready = false;
      while (!g_stop) {  // wait for a client, pinging the tracker every 2 s
        fd_set fds;
        FD_ZERO(&fds);
        FD_SET(listener, &fds);
        timeval tv{2, 0};
        if (select(listener + 1, &fds, nullptr, nullptr, &tv) > 0) {
          ready = true;
          break;
        }
        idle = tracker.Pending() ? 0 : idle + 1;
        if (idle > 3) {  // our key was handed out but nobody came: offer another
          if (!tracker.Put()) break;
          idle = 0;
        }
      }
      if (!ready) {
        status = g_stop ? 0 : 2;
        break;
      }
      expected = tracker.matchkey;
    }
    int conn = accept(listener, nullptr, nullptr);
    if (conn < 0) continue;
    std::string peer;
    if (!PeerAllowed(conn, allow, &peer)) {
      std::fprintf(stderr, "refused a connection from %s (not in --allow)\n", peer.c_str());
      close(conn);
      continue;
    }
    if (Handshake(conn, expected, key)) {  // not a client of ours (a port probe, a stale key): keep waiting
      g_conn = conn;
      try {
        serve(conn);
      } catch (const std::exception& err) {
        if (!g_stop) std::fprintf(stderr, "session ended with an error: %s\n", err.what());
      }
      g_conn = -1;
      offer = true;
      close(conn);
      if (once) break;
    } else {
      close(conn);
    }
  }
  close(listener);
  cleanup();
  return status;
}
