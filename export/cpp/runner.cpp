// Runs an exported model on one batch with libtorch alone, no Python: a TorchScript module (.pt) or an
// AOTInductor package (.aoti.pt2), as a C++ service would embed them. (A torch.export program, .program.pt2, is
// not a package: compile it with AOTInductor first.)
//
//   runner ARTIFACT INPUT [INPUT ...]      INPUT = FILE:DTYPE:D0xD1x...  (raw little-endian values, C order)
//
// DTYPE is float32, int64 or int32. Each output is printed as one line, "output <i> <dtype> <d0>x<d1>..." (numpy's
// name of the dtype) and then its values on one line, space separated, floats with 9 significant digits (enough
// to round-trip a float32). Exit status 2 for bad arguments, 1 when the model cannot be loaded or run.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

bool ends_with(const std::string& text, const std::string& tail) {
  return text.size() >= tail.size() && text.compare(text.size() - tail.size(), tail.size(), tail) == 0;
}

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "int64") return at::kLong;
  if (name == "int32") return at::kInt;
  throw std::invalid_argument("unknown dtype '" + name + "' (float32, int64 or int32)");
}

std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float32";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kBool: return "bool";
    case at::kByte: return "uint8";  // a segmenter's class mask
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kHalf: return "float16";
    case at::kDouble: return "float64";
    default: return c10::toString(type);
  }
}

// FILE:DTYPE:D0xD1x... -> a tensor holding the file's values; the file must hold exactly that many.
at::Tensor read_input(const std::string& argument) {
  const auto first = argument.find(':');
  const auto second = argument.find(':', first == std::string::npos ? first : first + 1);
  if (first == std::string::npos || second == std::string::npos)
    throw std::invalid_argument("input '" + argument + "' is not FILE:DTYPE:SHAPE");
  const std::string path = argument.substr(0, first);
  const auto dtype = parse_dtype(argument.substr(first + 1, second - first - 1));
  std::vector<int64_t> shape;
  std::stringstream dims(argument.substr(second + 1));
  for (std::string dim; std::getline(dims, dim, 'x');) shape.push_back(std::stoll(dim));
  at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(dtype));
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) throw std::invalid_argument("cannot open " + path);
  const auto bytes = static_cast<size_t>(file.tellg());
  if (bytes != tensor.nbytes())
    throw std::invalid_argument(path + " holds " + std::to_string(bytes) + " bytes; " + argument + " needs " +
                                std::to_string(tensor.nbytes()));
  file.seekg(0);
  file.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(bytes));
  return tensor;
}

std::vector<at::Tensor> run_torchscript(const std::string& path, const std::vector<at::Tensor>& inputs) {
  torch::jit::script::Module module = torch::jit::load(path);
  module.eval();
  c10::InferenceMode guard;
  const std::vector<torch::jit::IValue> arguments(inputs.begin(), inputs.end());
  const torch::jit::IValue result = module.forward(arguments);
  std::vector<at::Tensor> outputs;
  if (result.isTuple()) {
    for (const auto& element : result.toTupleRef().elements()) outputs.push_back(element.toTensor());
  } else {
    outputs.push_back(result.toTensor());
  }
  return outputs;
}

std::vector<at::Tensor> run_aoti(const std::string& path, const std::vector<at::Tensor>& inputs) {
  torch::inductor::AOTIModelPackageLoader loader(path);
  c10::InferenceMode guard;
  return loader.run(inputs);
}

void print(size_t index, const at::Tensor& output) {
  const at::Tensor values = output.contiguous().cpu();
  std::cout << "output " << index << " " << dtype_name(values.scalar_type()) << " ";
  for (int64_t d = 0; d < values.dim(); ++d) std::cout << (d ? "x" : "") << values.size(d);
  std::cout << "\n";
  const at::Tensor flat = values.reshape({-1});
  const bool floating = at::isFloatingType(flat.scalar_type());
  const at::Tensor as_double = flat.to(at::kDouble);
  const double* data = as_double.data_ptr<double>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    if (i) std::cout << ' ';
    if (floating) {
      char buffer[32];
      std::snprintf(buffer, sizeof buffer, "%.9g", data[i]);
      std::cout << buffer;
    } else {
      std::cout << static_cast<int64_t>(data[i]);
    }
  }
  std::cout << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " ARTIFACT(.pt|.aoti.pt2) FILE:DTYPE:D0xD1x... [more inputs]\n";
    return 2;
  }
  const std::string artifact = argv[1];
  std::vector<at::Tensor> inputs;
  try {
    for (int i = 2; i < argc; ++i) inputs.push_back(read_input(argv[i]));
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << "\n";
    return 2;
  }
  try {
    const auto outputs = ends_with(artifact, ".pt2") ? run_aoti(artifact, inputs) : run_torchscript(artifact, inputs);
    for (size_t i = 0; i < outputs.size(); ++i) print(i, outputs[i]);
  } catch (const c10::Error& error) {
    std::cerr << "error: " << artifact << ": " << error.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "error: " << artifact << ": " << error.what() << "\n";
    return 1;
  }
  return 0;
}
