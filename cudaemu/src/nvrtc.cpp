// The emulated NVRTC (libnvrtc.so): compiles a CUDA C kernel source with the system C++
// compiler into a shared object that the emulated driver loads. The "CUBIN" it hands back names
// that shared object. What it does to a source, in order:
//   1. strips comments (kept line breaks, so the compiler's line numbers still match);
//   2. rewrites each `extern __shared__ T name[];` into a pointer to the launch's dynamic
//      shared memory;
//   3. appends, for every `extern "C" __global__` kernel, an entry point taking the driver's
//      `void** kernelParams` and a table of the parameters' sizes and alignments (so the driver
//      can check a launch's arguments and their total size);
//   4. compiles it with cudaemu_device.h in front (-include), without FMA contraction, into a
//      cache keyed by a hash of everything that goes into it.
#include <dlfcn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <map>
#include <mutex>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

extern "C" {
typedef enum {
    NVRTC_SUCCESS = 0,
    NVRTC_ERROR_OUT_OF_MEMORY = 1,
    NVRTC_ERROR_PROGRAM_CREATION_FAILURE = 2,
    NVRTC_ERROR_INVALID_INPUT = 3,
    NVRTC_ERROR_INVALID_PROGRAM = 4,
    NVRTC_ERROR_INVALID_OPTION = 5,
    NVRTC_ERROR_COMPILATION = 6,
    NVRTC_ERROR_INTERNAL_ERROR = 11,
} nvrtcResult;
typedef struct Program* nvrtcProgram;
}

struct Program {
    std::string source, name, log, module_path;
    bool compiled = false;
};

namespace {

std::string strip_comments(const std::string& s) {
    std::string out;
    out.reserve(s.size());
    size_t i = 0;
    while (i < s.size()) {
        if (s[i] == '"' || s[i] == '\'') {  // a literal, copied as it is
            char quote = s[i];
            out += s[i++];
            while (i < s.size() && s[i] != quote) {
                if (s[i] == '\\' && i + 1 < s.size()) out += s[i++];
                out += s[i++];
            }
            if (i < s.size()) out += s[i++];
        } else if (s.compare(i, 2, "//") == 0) {
            while (i < s.size() && s[i] != '\n') i++;
        } else if (s.compare(i, 2, "/*") == 0) {
            i += 2;
            while (i < s.size() && s.compare(i, 2, "*/") != 0) {
                if (s[i] == '\n') out += '\n';
                i++;
            }
            i = std::min(s.size(), i + 2);
            out += ' ';
        } else {
            out += s[i++];
        }
    }
    return out;
}

// `extern __shared__ T name[];` names the launch's dynamic shared memory. Inside a function it
// becomes a local pointer to it; at file scope a macro, since a global would be initialised
// once, when the module is loaded, before any launch has a buffer.
std::string rewrite_dynamic_shared(const std::string& src) {
    static const std::regex declaration(
        R"(extern\s+__shared__\s+((?:[A-Za-z_]\w*\s+)*?[A-Za-z_]\w*)\s*([A-Za-z_]\w*)\s*\[\s*\]\s*;)");
    std::string out;
    size_t copied = 0;
    int depth = 0;
    size_t scanned = 0;
    for (auto it = std::sregex_iterator(src.begin(), src.end(), declaration);
         it != std::sregex_iterator(); ++it) {
        size_t at = it->position(0);
        for (; scanned < at; scanned++) depth += src[scanned] == '{' ? 1 : src[scanned] == '}' ? -1 : 0;
        std::string type = (*it)[1], name = (*it)[2];
        out += src.substr(copied, at - copied);
        out += depth > 0 ? type + "* " + name + " = (" + type + "*)cudaemu_dynamic_smem();"
                         : "#define " + name + " ((" + type + "*)cudaemu_dynamic_smem())\n";
        copied = at + it->length(0);
    }
    return out + src.substr(copied);
}

std::string trim(const std::string& s) {
    size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
    return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

// The entry points and parameter tables of every `extern "C" __global__` kernel of `src`.
bool kernel_entries(const std::string& src, std::string& out, std::string& log) {
    static const std::regex kernel(
        R"(extern\s+"C"\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\()");
    for (auto it = std::sregex_iterator(src.begin(), src.end(), kernel);
         it != std::sregex_iterator(); ++it) {
        std::string name = (*it)[1];
        size_t pos = it->position(0) + it->length(0), depth = 1, start = pos;
        std::vector<std::string> params;
        for (; pos < src.size() && depth > 0; pos++) {
            char c = src[pos];
            if (c == '(' || c == '[' || c == '<') depth++;
            if (c == ')' || c == ']' || c == '>') depth--;
            if ((c == ',' && depth == 1) || depth == 0) {
                params.push_back(trim(src.substr(start, pos - start)));
                start = pos + 1;
            }
        }
        if (depth != 0) {
            log += "cudaemu: cannot find the end of the parameter list of kernel " + name + "\n";
            return false;
        }
        if (params.size() == 1 && (params[0].empty() || params[0] == "void")) params.clear();
        std::string call, table;
        for (size_t k = 0; k < params.size(); k++) {
            static const std::regex last_word(R"(^(.*[^A-Za-z_0-9])([A-Za-z_]\w*)$)");
            std::smatch m;
            if (!std::regex_match(params[k], m, last_word)) {
                log += "cudaemu: cannot read parameter '" + params[k] + "' of kernel " + name + "\n";
                return false;
            }
            std::string type = std::regex_replace(std::string(m[1]), std::regex(R"(\b__restrict__\b)"), "");
            type = trim(type);
            call += (k ? ", " : "") + std::string("*(") + type + "*)p[" + std::to_string(k) + "]";
            table += ", sizeof(" + type + "), alignof(" + type + ")";
        }
        out += "extern \"C\" __attribute__((visibility(\"default\"))) void cudaemu_entry_" + name +
               "(void** p) { (void)p; " + name + "(" + call + "); }\n";
        out += "extern \"C\" __attribute__((visibility(\"default\"))) const unsigned long long "
               "cudaemu_params_" + name + "[] = { " + std::to_string(params.size()) + table + " };\n";
    }
    return true;
}

std::string directory_of_this_library() {
    Dl_info info;
    if (dladdr((void*)&directory_of_this_library, &info) == 0 || !info.dli_fname) return ".";
    std::string path = info.dli_fname;
    size_t slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
}

bool is_executable(const std::string& path) { return access(path.c_str(), X_OK) == 0; }

// The compiler's path and what it says its version is, for the cache key: an upgraded
// compiler recompiles.
std::string compiler_identity(const std::string& compiler) {
    static std::mutex lock;
    static std::map<std::string, std::string> known;
    std::lock_guard<std::mutex> g(lock);
    auto it = known.find(compiler);
    if (it != known.end()) return it->second;
    std::string version;
    if (FILE* p = popen(("'" + compiler + "' --version 2>&1").c_str(), "r")) {
        char buf[512];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, p)) > 0) version.append(buf, n);
        pclose(p);
    }
    return known[compiler] = compiler + "\n" + version;
}

std::string find_compiler() {
    if (const char* cxx = getenv("CUDAEMU_CXX"); cxx && *cxx) return cxx;
    const char* path = getenv("PATH");
    std::string dirs = path ? path : "/usr/bin:/bin";
    for (const char* name : {"c++", "g++", "clang++"}) {
        std::stringstream ss(dirs);
        std::string dir;
        while (std::getline(ss, dir, ':'))
            if (!dir.empty() && is_executable(dir + "/" + name)) return dir + "/" + name;
    }
    return "";
}

std::string cache_dir() {
    std::string dir;
    if (const char* d = getenv("CUDAEMU_CACHE"); d && *d) {
        dir = d;
    } else if (const char* x = getenv("XDG_CACHE_HOME"); x && *x) {
        dir = std::string(x) + "/cudaemu";
    } else if (const char* h = getenv("HOME"); h && *h) {
        dir = std::string(h) + "/.cache/cudaemu";
    } else {
        dir = "/tmp/cudaemu-" + std::to_string(getuid());
    }
    // Create each missing level.
    for (size_t i = 1; i <= dir.size(); i++)
        if (i == dir.size() || dir[i] == '/') mkdir(dir.substr(0, i).c_str(), 0755);
    return dir;
}

unsigned long long fnv1a(const std::string& s, unsigned long long h = 1469598103934665603ull) {
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

std::string quote(const std::string& s) {
    std::string out = "'";
    for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return out + "'";
}

// Runs `command` through the shell, appending what it prints to `log`; true on exit 0.
bool run(const std::string& command, std::string& log) {
    FILE* p = popen((command + " 2>&1").c_str(), "r");
    if (!p) {
        log += "cudaemu: cannot start the C++ compiler\n";
        return false;
    }
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) log.append(buf, n);
    int status = pclose(p);
    return status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

nvrtcResult compile(Program& prog, const std::vector<std::string>& options) {
    std::string defines;
    for (const std::string& o : options) {
        if (o.rfind("--gpu-architecture", 0) == 0 || o.rfind("-arch", 0) == 0 ||
            o.rfind("--std", 0) == 0 || o.rfind("-std", 0) == 0 ||
            o == "--use_fast_math" || o == "-use_fast_math" || o == "-default-device" ||
            o == "--device-as-default-execution-space" || o.rfind("-lineinfo", 0) == 0 ||
            o.rfind("--generate-line-info", 0) == 0 || o == "-G" || o == "--device-debug" ||
            o.rfind("--fmad", 0) == 0 || o.rfind("-fmad", 0) == 0) {
            continue;  // the architecture, standard and code-generation switches do not apply
        } else if (o.rfind("-D", 0) == 0 || o.rfind("--define-macro", 0) == 0 ||
                   o.rfind("-I", 0) == 0 || o.rfind("--include-path", 0) == 0) {
            std::string v = o.rfind("--define-macro=", 0) == 0 ? "-D" + o.substr(15)
                            : o.rfind("--include-path=", 0) == 0 ? "-I" + o.substr(15)
                                                                 : o;
            defines += " " + quote(v);
        } else {
            prog.log += "nvrtc: error: unrecognized option " + o + "\n";
            return NVRTC_ERROR_INVALID_OPTION;
        }
    }
    std::string src = strip_comments(prog.source);
    src = rewrite_dynamic_shared(src);
    std::string entries;
    if (!kernel_entries(src, entries, prog.log)) return NVRTC_ERROR_COMPILATION;
    src += "\n" + entries;

    std::string compiler = find_compiler();
    if (compiler.empty()) {
        prog.log += "cudaemu: no C++ compiler found (set CUDAEMU_CXX, or install g++ or clang++)\n";
        return NVRTC_ERROR_COMPILATION;
    }
    std::string header = directory_of_this_library() + "/cudaemu_device.h";
    std::string header_text = read_file(header);
    if (header_text.empty()) {
        prog.log += "cudaemu: " + header + " is missing (it is built beside libnvrtc.so)\n";
        return NVRTC_ERROR_INTERNAL_ERROR;
    }
    const char* extra = getenv("CUDAEMU_CXXFLAGS");
    // -fstack-clash-protection: a kernel's large local array probes its stack page by page,
    // so overrunning a fiber's stack hits its guard page instead of another fiber's stack.
    std::string flags = "-std=c++17 -O2 -fPIC -shared -ffp-contract=off -fno-fast-math "
                        "-fstack-clash-protection -fvisibility=hidden -Wno-attributes" +
                        defines + (extra ? " " + std::string(extra) : "");
    std::string key_text = compiler_identity(compiler) + "\n" + flags + "\n" + header_text + "\n" + src;
    char key[32];
    snprintf(key, sizeof key, "%016llx", fnv1a(key_text));
    std::string dir = cache_dir();
    std::string module = dir + "/" + key + ".so";
    if (access(module.c_str(), R_OK) != 0) {
        // A name no other process or thread uses: pid, and a per-process counter.
        static std::atomic<unsigned> counter{0};
        std::string stem = dir + "/" + key + ".tmp-" + std::to_string(getpid()) + "-" +
                           std::to_string(counter++);
        {
            std::ofstream f(stem + ".cpp", std::ios::binary);
            f << src;
            if (!f) {
                prog.log += "cudaemu: cannot write " + stem + ".cpp\n";
                return NVRTC_ERROR_INTERNAL_ERROR;
            }
        }
        std::string command = quote(compiler) + " " + flags + " -include " + quote(header) +
                              " -o " + quote(stem + ".so") + " -x c++ " + quote(stem + ".cpp");
        bool ok = run(command, prog.log);
        unlink((stem + ".cpp").c_str());
        if (!ok || rename((stem + ".so").c_str(), module.c_str()) != 0) {
            unlink((stem + ".so").c_str());
            if (prog.log.empty()) prog.log = "cudaemu: the C++ compiler failed\n";
            return NVRTC_ERROR_COMPILATION;
        }
    }
    prog.module_path = module;
    prog.compiled = true;
    return NVRTC_SUCCESS;
}

// The "machine code": a marker and the shared object's path, NUL-terminated.
std::string image(const Program& p) { return "CUDAEMU-MODULE\n" + p.module_path; }

}  // namespace

extern "C" {

__attribute__((visibility("default"))) const char* nvrtcGetErrorString(nvrtcResult r) {
    switch (r) {
        case NVRTC_SUCCESS: return "NVRTC_SUCCESS";
        case NVRTC_ERROR_OUT_OF_MEMORY: return "NVRTC_ERROR_OUT_OF_MEMORY";
        case NVRTC_ERROR_PROGRAM_CREATION_FAILURE: return "NVRTC_ERROR_PROGRAM_CREATION_FAILURE";
        case NVRTC_ERROR_INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
        case NVRTC_ERROR_INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
        case NVRTC_ERROR_INVALID_OPTION: return "NVRTC_ERROR_INVALID_OPTION";
        case NVRTC_ERROR_COMPILATION: return "NVRTC_ERROR_COMPILATION";
        default: return "NVRTC_ERROR_INTERNAL_ERROR";
    }
}

__attribute__((visibility("default"))) nvrtcResult nvrtcVersion(int* major, int* minor) {
    if (!major || !minor) return NVRTC_ERROR_INVALID_INPUT;
    *major = 13;
    *minor = 0;
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcCreateProgram(
    nvrtcProgram* prog, const char* src, const char* name, int num_headers,
    const char* const* headers, const char* const* include_names) {
    if (!prog || !src || num_headers < 0) return NVRTC_ERROR_INVALID_INPUT;
    if (num_headers > 0) {
        // In-memory headers would need a virtual include path; our kernels use none.
        (void)headers;
        (void)include_names;
        return NVRTC_ERROR_INVALID_INPUT;
    }
    Program* p = new Program;
    p->source = src;
    p->name = name ? name : "default_program";
    *prog = p;
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcDestroyProgram(nvrtcProgram* prog) {
    if (!prog || !*prog) return NVRTC_ERROR_INVALID_PROGRAM;
    delete *prog;
    *prog = nullptr;
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcCompileProgram(
    nvrtcProgram prog, int num_options, const char* const* options) {
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    if (num_options < 0 || (num_options > 0 && !options)) return NVRTC_ERROR_INVALID_INPUT;
    try {
        std::vector<std::string> opts(options, options + num_options);
        prog->log.clear();
        return compile(*prog, opts);
    } catch (const std::bad_alloc&) {
        return NVRTC_ERROR_OUT_OF_MEMORY;
    } catch (...) {
        return NVRTC_ERROR_INTERNAL_ERROR;
    }
}

__attribute__((visibility("default"))) nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram prog,
                                                                          size_t* size) {
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    if (!size) return NVRTC_ERROR_INVALID_INPUT;
    *size = prog->log.size() + 1;
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcGetProgramLog(nvrtcProgram prog,
                                                                      char* log) {
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    if (!log) return NVRTC_ERROR_INVALID_INPUT;
    memcpy(log, prog->log.c_str(), prog->log.size() + 1);
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcGetCUBINSize(nvrtcProgram prog,
                                                                     size_t* size) {
    if (!prog || !prog->compiled) return NVRTC_ERROR_INVALID_PROGRAM;
    if (!size) return NVRTC_ERROR_INVALID_INPUT;
    *size = image(*prog).size() + 1;
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcGetCUBIN(nvrtcProgram prog, char* out) {
    if (!prog || !prog->compiled) return NVRTC_ERROR_INVALID_PROGRAM;
    if (!out) return NVRTC_ERROR_INVALID_INPUT;
    std::string img = image(*prog);
    memcpy(out, img.c_str(), img.size() + 1);
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcGetPTXSize(nvrtcProgram prog,
                                                                   size_t* size) {
    return nvrtcGetCUBINSize(prog, size);
}

__attribute__((visibility("default"))) nvrtcResult nvrtcGetPTX(nvrtcProgram prog, char* out) {
    return nvrtcGetCUBIN(prog, out);
}

}  // extern "C"
