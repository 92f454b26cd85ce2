// The target_modules regex matcher: a table of (pattern, text, expected) over every supported
// construct, with the expected values taken from Python's re.fullmatch; every rejected
// construct and malformed pattern as a format_error naming it and its position; hostile
// patterns and texts, whose work is counted against program size x (text size + 1); the
// length, repetition and nesting limits; and a seeded cross-check against std::regex.
#include <doctest/doctest.h>

#include <molora/io/regex.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace test_regex {

using molora::io::Regex;
using test_util::error_of;

namespace {

struct Case {
  const char* pattern;
  const char* text;
  bool expected;
};

// Expected values are what Python 3.11's re.fullmatch(pattern, text) returns.
const Case kCases[] = {
    {R"(abc)", "abc", true},
    {R"(abc)", "ab", false},
    {R"(abc)", "abcd", false},
    {R"(abc)", "", false},
    {R"()", "", true},
    {R"()", "a", false},
    {R"(a\.b)", "a.b", true},
    {R"(a\.b)", "axb", false},
    {R"(a\\b)", "a\\b", true},
    {R"(a\\b)", "ab", false},
    {R"(\d+)", "0123", true},
    {R"(\d+)", "12a", false},
    {R"(\d+)", "", false},
    {R"(\D\D)", "ab", true},
    {R"(\D\D)", "a1", false},
    {R"(\w+)", "layer_0", true},
    {R"(\w+)", "a.b", false},
    {R"(\W)", ".", true},
    {R"(\W)", "_", false},
    {R"(\s)", " ", true},
    {R"(\s)", "\t", true},
    {R"(\s)", "\n", true},
    {R"(\s)", "\x1c", true},
    {R"(\s)", "a", false},
    {R"(\S+)", "a.b", true},
    {R"(\S+)", "a b", false},
    {R"(\*\+\?\(\)\[\]\{\}\|\^\$)", "*+?()[]{}|^$", true},
    {R"(\x41\t)", "A\t", true},
    {R"(\x41\t)", "A ", false},
    {R"(a\-b)", "a-b", true},
    {R"(a.c)", "abc", true},
    {R"(a.c)", "a.c", true},
    {R"(a.c)", "a\nc", false},
    {R"(a.c)", "ac", false},
    {R"(.*)", "", true},
    {R"(.*)", "anything at all", true},
    {R"([abc]+)", "abccba", true},
    {R"([abc]+)", "abd", false},
    {R"([a-z]+)", "layers", true},
    {R"([a-z]+)", "Layers", false},
    {R"([^a-z])", "A", true},
    {R"([^a-z])", "a", false},
    {R"([^a-z])", "\n", true},
    {R"([]a])", "]", true},
    {R"([]a])", "a", true},
    {R"([]a])", "b", false},
    {R"([^]a])", "]", false},
    {R"([^]a])", "b", true},
    {R"([a-])", "-", true},
    {R"([a-])", "a", true},
    {R"([a-])", "b", false},
    {R"([-a])", "-", true},
    {R"([-a])", "a", true},
    {R"([\d.]+)", "1.5", true},
    {R"([\d.]+)", "1,5", false},
    {R"([\w\-]+)", "q-proj_1", true},
    {R"([\w\-]+)", "q proj", false},
    {R"([^\s]+)", "abc", true},
    {R"([^\s]+)", "a c", false},
    {R"([\]\\])", "]", true},
    {R"([\]\\])", "\\", true},
    {R"([\x30-\x32])", "1", true},
    {R"([\x30-\x32])", "3", false},
    {R"([\b])", "\b", true},
    {R"([\b])", "b", false},
    {R"([.])", ".", true},
    {R"([.])", "a", false},
    {R"((ab)+)", "abab", true},
    {R"((ab)+)", "aba", false},
    {R"((?:ab)+c)", "ababc", true},
    {R"((?:ab)+c)", "abc", true},
    {R"((?:ab)+c)", "c", false},
    {R"(a|b|c)", "a", true},
    {R"(a|b|c)", "c", true},
    {R"(a|b|c)", "ab", false},
    {R"(ab|)", "ab", true},
    {R"(ab|)", "", true},
    {R"(ab|)", "a", false},
    {R"((a|ab)(c|bcd))", "abcd", true},
    {R"((a|ab)(c|bcd))", "ac", true},
    {R"((a|ab)(c|bcd))", "abc", true},
    {R"(())", "", true},
    {R"(())", "a", false},
    {R"(()*)", "", true},
    {R"(()*)", "a", false},
    {R"(((a)))", "a", true},
    {R"(a*)", "", true},
    {R"(a*)", "aaaa", true},
    {R"(a*)", "ab", false},
    {R"(a+)", "", false},
    {R"(a+)", "a", true},
    {R"(a+)", "aaa", true},
    {R"(a?b)", "b", true},
    {R"(a?b)", "ab", true},
    {R"(a?b)", "aab", false},
    {R"(a*?b)", "aab", true},
    {R"(a*?b)", "b", true},
    {R"(a+?)", "aaa", true},
    {R"(a+?)", "", false},
    {R"(a??b)", "ab", true},
    {R"(a??b)", "b", true},
    {R"(a{3})", "aa", false},
    {R"(a{3})", "aaa", true},
    {R"(a{3})", "aaaa", false},
    {R"(a{2,})", "a", false},
    {R"(a{2,})", "aa", true},
    {R"(a{2,})", "aaaaa", true},
    {R"(a{1,3})", "", false},
    {R"(a{1,3})", "a", true},
    {R"(a{1,3})", "aaa", true},
    {R"(a{1,3})", "aaaa", false},
    {R"(a{,2})", "", true},
    {R"(a{,2})", "aa", true},
    {R"(a{,2})", "aaa", false},
    {R"(a{0}b)", "b", true},
    {R"(a{0}b)", "ab", false},
    {R"(a{2,3}?)", "aa", true},
    {R"(a{2,3}?)", "aaa", true},
    {R"(a{2,3}?)", "a", false},
    {R"((ab){2})", "abab", true},
    {R"((ab){2})", "ab", false},
    {R"((a|b){2,3}c)", "abc", true},
    {R"((a|b){2,3}c)", "abac", true},
    {R"((a|b){2,3}c)", "ac", false},
    {R"(a{)", "a{", true},
    {R"(a{})", "a{}", true},
    {R"(a{x})", "a{x}", true},
    {R"(a{1)", "a{1", true},
    {R"(a{,})", "", true},
    {R"(a{,})", "aaa", true},
    {R"(x{0,0})", "", true},
    {R"(x{0,0})", "x", false},
    {R"((a*)*)", "", true},
    {R"((a*)*)", "aaa", true},
    {R"((a*)*)", "b", false},
    {R"((a*)+b)", "b", true},
    {R"((a*)+b)", "aab", true},
    {R"((a|aa)*b)", "aaab", true},
    {R"((a|aa)*b)", "aaa", false},
    {R"(^abc$)", "abc", true},
    {R"(^abc$)", "abcd", false},
    {R"(^a|b$)", "a", true},
    {R"(^a|b$)", "b", true},
    {"a$\n", "a\n", true},
    {R"(a$)", "a", true},
    {R"(a$)", "a\n", false},
    {R"(a^b)", "ab", false},
    {R"((^a)*)", "", true},
    {R"((^a)*)", "a", true},
    {R"((^a)*)", "aa", false},
    {R"(a}b])", "a}b]", true},
    {R"(#x y)", "#x y", true},
    {R"(.*\.(q|v)_proj)", "model.layers.0.self_attn.q_proj", true},
    {R"(.*\.(q|v)_proj)", "model.layers.0.self_attn.v_proj", true},
    {R"(.*\.(q|v)_proj)", "model.layers.0.self_attn.k_proj", false},
    {R"(.*\.(q|v)_proj)", "q_proj", false},
    {R"(.*\.(q|v)_proj)", "model.layers.0.self_attn.q_proj.lora_A", false},
    {R"(model\.layers\.\d+\.self_attn\.(q_proj|v_proj))", "model.layers.12.self_attn.q_proj", true},
    {R"(model\.layers\.\d+\.self_attn\.(q_proj|v_proj))", "model.layers.7.self_attn.v_proj", true},
    {R"(model\.layers\.\d+\.self_attn\.(q_proj|v_proj))", "model.layers.x.self_attn.q_proj", false},
    {R"(model\.layers\.\d+\.self_attn\.(q_proj|v_proj))", "model.layers.12.self_attn.o_proj", false},
    {R"(model\.layers\.\d+\.self_attn\.(q_proj|v_proj))", "model.layers..self_attn.q_proj", false},
    {R"(model\.layers\.\d+\.self_attn\.(q_proj|v_proj))", "base_model.model.layers.1.self_attn.q_proj", false},
    {R"(.*decoder.*(SelfAttention|EncDecAttention).*(q|v)$)", "decoder.block.0.layer.0.SelfAttention.q", true},
    {R"(.*decoder.*(SelfAttention|EncDecAttention).*(q|v)$)", "decoder.block.3.layer.1.EncDecAttention.v", true},
    {R"(.*decoder.*(SelfAttention|EncDecAttention).*(q|v)$)", "encoder.block.0.layer.0.SelfAttention.q", false},
    {R"(.*decoder.*(SelfAttention|EncDecAttention).*(q|v)$)", "decoder.block.0.layer.0.SelfAttention.k", false},
    {R"(.*decoder.*(SelfAttention|EncDecAttention).*(q|v)$)", "decoder.block.0.layer.1.DenseReluDense.wi", false},
    {R"(^(?:model\.)?layers\.([0-9]|1[0-5])\.mlp\.(gate|up|down)_proj$)", "model.layers.15.mlp.up_proj", true},
    {R"(^(?:model\.)?layers\.([0-9]|1[0-5])\.mlp\.(gate|up|down)_proj$)", "layers.3.mlp.gate_proj", true},
    {R"(^(?:model\.)?layers\.([0-9]|1[0-5])\.mlp\.(gate|up|down)_proj$)", "model.layers.16.mlp.up_proj", false},
    {R"(^(?:model\.)?layers\.([0-9]|1[0-5])\.mlp\.(gate|up|down)_proj$)", "model.layers.3.mlp.fc_proj", false},
    {R"(.*\.(?:experts\.\d+\.)?(w1|w2|w3))", "model.layers.0.mlp.experts.3.w2", true},
    {R"(.*\.(?:experts\.\d+\.)?(w1|w2|w3))", "model.layers.0.mlp.w1", true},
    {R"(.*\.(?:experts\.\d+\.)?(w1|w2|w3))", "w1", false},
};

}  // namespace

TEST_CASE("Regex: full_match agrees with Python's re.fullmatch on every supported construct") {
  for (const Case& c : kCases) {
    const std::string pattern = c.pattern, text = c.text;
    CAPTURE(pattern);
    CAPTURE(text);
    const Regex re(c.pattern);
    CHECK(re.full_match(c.text) == c.expected);
    CHECK(re.pattern() == c.pattern);
  }
}

TEST_CASE("Regex: matches bytes; bytes >= 0x80 only through '.', negated classes and \\D \\W \\S") {
  const std::string e_acute = "\xc3\xa9";  // UTF-8 for U+00E9, two bytes
  CHECK(Regex("..").full_match(e_acute));
  CHECK_FALSE(Regex(".").full_match(e_acute));
  CHECK(Regex(R"(\W\W)").full_match(e_acute));
  CHECK_FALSE(Regex(R"(\w+)").full_match(e_acute));
  CHECK(Regex("[^a]+").full_match(e_acute));
  CHECK(Regex(std::string("a\0b", 3)).full_match(std::string("a\0b", 3)));
  CHECK_FALSE(Regex(std::string("a\0b", 3)).full_match("ab"));
}

TEST_CASE("Regex: each unsupported construct is a format_error naming it and its position") {
  struct Unsupported {
    const char* pattern;
    const char* construct;
    std::size_t position;
  };
  const Unsupported cases[] = {
      {"a(?=b)", "(?=", 1},       {"(?!x)a", "(?!", 0},        {"x(?<=a)b", "(?<=", 1}, {"(?<!a)b", "(?<!", 0},
      {"(?P<name>a)", "(?P<", 0}, {"(a)(?P=name)", "(?P=", 3}, {"(?<n>a)", "(?<", 0},   {"(a)\\1", "\\1", 3},
      {"\\0", "\\0", 0},          {"[\\1]", "\\1", 1},         {"(?i)abc", "(?i", 0},   {"(?i:a)", "(?i", 0},
      {"(?s).", "(?s", 0},        {"(?#c)a", "(?#", 0},        {"(?>a)", "(?>", 0},     {"(?(1)a|b)", "(?(", 0},
      {"a*+", "*+", 1},           {"ba++", "++", 2},           {"a?+", "?+", 1},        {"a{2}+", "{2}+", 1},
      {"\\ba", "\\b", 0},         {"a\\B", "\\B", 1},          {"\\Aa", "\\A", 0},      {"a\\Z", "\\Z", 1},
      {"\\p{L}", "\\p", 0},       {"\\P{L}", "\\P", 0},        {"\\N{DASH}", "\\N", 0}, {"\\u0041", "\\u", 0},
      {"\\U00000041", "\\U", 0},
      {"layers\\.\xc3\xa9", "non-ASCII byte \\xc3", 8}, {"a[\xe9]", "non-ASCII byte \\xe9", 2},
      {"\\x80", "non-ASCII code point \\x80", 0},       {"[a\\xff]", "non-ASCII code point \\xff", 2},
  };
  for (const auto& c : cases) {
    const std::string pattern = c.pattern;
    CAPTURE(pattern);
    const std::string msg = error_of([&] { Regex(c.pattern, 4096, "cfg.json: target_modules"); });
    CHECK(msg.find(molora::detail::cat("cfg.json: target_modules: unsupported regex construct '", c.construct,
                                       "' at position ", c.position, " in pattern ")) != std::string::npos);
    const bool printable = std::all_of(pattern.begin(), pattern.end(), [](char ch) { return ch >= 0x20 && ch < 0x7f; });
    if (printable) CHECK(msg.find("in pattern '" + pattern + "'") != std::string::npos);
  }
  // other bytes are shown escaped
  CHECK(error_of([] { Regex("a\tb\xc3\xa9"); }).find("in pattern 'a\\x09b\\xc3\\xa9'") != std::string::npos);
}

TEST_CASE("Regex: each malformed pattern is a format_error saying what was expected and what was found") {
  struct Malformed {
    const char* pattern;
    std::size_t position;
    const char* expected;  // part of the "expected ..., got ..." text
  };
  const Malformed cases[] = {
      {"(ab", 3, "expected ')' closing the group opened at position 0, got end of pattern"},
      {"(?:a", 4, "expected ')' closing the group opened at position 0, got end of pattern"},
      {"a(b|c", 5, "expected ')' closing the group opened at position 1"},
      {"ab)", 2, "got an unbalanced ')'"},
      {"[a", 0, "expected ']' closing the class, got end of pattern"},
      {"[]", 0, "expected ']' closing the class"},
      {"[a-", 0, "expected ']' closing the class"},
      {"[z-a]", 1, "expected a range whose start is not after its end (by byte value), got 'z-a'"},
      {"[\\d-z]", 1, "expected a range between two single characters, got '\\d-z'"},
      {"[a-\\w]", 1, "got 'a-\\w'"},
      {"*a", 0, "got nothing to repeat"},
      {"+", 0, "got nothing to repeat"},
      {"a|*", 2, "got nothing to repeat"},
      {"(*)", 1, "got nothing to repeat"},
      {"{2}", 0, "got nothing to repeat"},
      {"a**", 2, "got a second quantifier"},
      {"a*??", 3, "got a second quantifier"},
      {"a{2}{3}", 4, "got a second quantifier"},
      {"^*", 1, "got an anchor"},
      {"a$?", 2, "got an anchor"},
      {"a{3,2}", 1, "expected a repeat count {n,m} with n <= m, got {3,2}"},
      {"a{1001}", 1, "expected a repeat count of at most 1000, got 1001"},
      {"a{1,99999999999999999999}", 1, "got 99999999999999999999"},
      {"ab\\", 2, "expected a character after '\\', got end of pattern"},
      {"\\q", 0, "expected a known escape, got '\\q'"},
      {"\\xZ1", 0, "expected two hex digits after '\\x', got '\\xZ1'"},
      {"a\\x4", 1, "expected two hex digits after '\\x', got '\\x4'"},
      {"(?", 1, "expected ':' after '(?', got end of pattern"},
  };
  for (const auto& c : cases) {
    const std::string pattern = c.pattern;
    CAPTURE(pattern);
    const std::string msg = error_of([&] { Regex(c.pattern, 4096, "target_modules"); });
    CHECK(msg.find(molora::detail::cat("target_modules: malformed regex at position ", c.position, " in pattern '",
                                       c.pattern, "'")) != std::string::npos);
    CHECK(msg.find(c.expected) != std::string::npos);
  }
}

TEST_CASE("Regex: (a|aa)*b and (a*)*b on 5000 a's do work linear in the text") {
  // Patterns on which a backtracking matcher takes time exponential in the text.
  struct Hostile {
    const char* pattern;
    bool matches_as;   // on n 'a'
    bool matches_asb;  // on n 'a' then 'b'
  };
  const Hostile cases[] = {
      {"(a|aa)*b", false, true}, {"(a*)*b", false, true},  {"(a|a)*b", false, true},
      {"(a+)+b", false, true},   {"(.*)*x", false, false}, {"(a|aa)*", true, false},
  };
  // Growing lengths with REQUIRE, so that a matcher whose work explodes stops at a short
  // text instead of running for ages on the long one.
  for (const auto& c : cases) {
    const std::string pattern = c.pattern;
    CAPTURE(pattern);
    const Regex re(c.pattern);
    const std::size_t lengths[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 5000};
    for (const std::size_t n : lengths) {
      CAPTURE(n);
      const std::string as(n, 'a');
      std::size_t steps = 0;
      CHECK(re.full_match(as, steps) == c.matches_as);
      REQUIRE(steps <= re.program_size() * (as.size() + 1));
      CHECK(steps >= as.size());  // the count is real work, not a constant
      CHECK(re.full_match(as + "b", steps) == c.matches_asb);
      REQUIRE(steps <= re.program_size() * (as.size() + 2));
    }
  }
  // (a?){n}a{n} on n a's: 2^n paths for a backtracker, program size 3n + 1 here
  const std::string a1000(1000, 'a');
  const Regex re("(a?){1000}a{1000}");
  std::size_t steps = 0;
  CHECK(re.full_match(a1000, steps));
  CHECK(steps <= re.program_size() * (a1000.size() + 1));
  CHECK_FALSE(re.full_match(a1000.substr(1), steps));
}

TEST_CASE("Regex: .* and (.)* on a 200000-byte text use no recursion on the text") {
  std::string text(200000, 'x');
  text[100000] = '.';
  for (const std::string pattern : {".*", "(.)*", "(?:.|\\.)*", "(x|\\.)+", "^[^\\n]*$", ".*\\..*"}) {
    CAPTURE(pattern);
    const Regex re(pattern);
    std::size_t steps = 0;
    CHECK(re.full_match(text, steps));
    CHECK(steps <= re.program_size() * (text.size() + 1));
  }
  CHECK_FALSE(Regex(".*y").full_match(text));
  CHECK_FALSE(Regex("x*").full_match(text));
  text[150000] = '\n';  // '.' does not match a newline
  CHECK_FALSE(Regex(".*").full_match(text));
  CHECK(Regex(R"((.|\n)*)").full_match(text));
}

TEST_CASE("Regex: a pattern at the length limit compiles, one byte over it is a format_error") {
  const std::string at_limit(4096, 'a');
  CHECK(Regex(at_limit).full_match(at_limit));
  const std::string over = at_limit + "a";
  const std::string msg = error_of([&] { Regex{over}; });
  CHECK(msg.find("regex pattern length: expected at most 4096 bytes, got 4097") != std::string::npos);
  CHECK(msg.find("(first 200 of 4097 bytes)") != std::string::npos);  // the message is cut
  CHECK(msg.size() < 400);
  // the limit is the caller's
  CHECK(Regex("abcd", 4).full_match("abcd"));
  CHECK(error_of([] {
          Regex("abcde", 4, "cfg: target_modules");
        }).find("cfg: target_modules: regex pattern length: expected at most 4 bytes, got 5") != std::string::npos);
  CHECK(Regex(over, over.size()).full_match(over));
  CHECK(Regex("a{3}", std::numeric_limits<std::size_t>::max()).full_match("aaa"));  // no overflow in the cap
}

TEST_CASE("Regex: bounded repetition expands up to 8 instructions per allowed pattern byte") {
  // a{1000} is 1000 instructions; nesting multiplies: (a{100}){100} would be 10000
  CHECK(Regex("a{1000}").full_match(std::string(1000, 'a')));
  CHECK_FALSE(Regex("a{1000}").full_match(std::string(999, 'a')));
  const Regex fits("(a{100}){100}", 4096);  // 10001 <= 8 x 4096
  CHECK(fits.program_size() == 10001);
  CHECK(fits.full_match(std::string(10000, 'a')));
  const std::string msg = error_of([] { Regex("(a{100}){100}", 1024, "target_modules"); });
  CHECK(msg.find("target_modules: regex program size: expected at most 8192 NFA instructions, got more") !=
        std::string::npos);
  CHECK(msg.find("'(a{100}){100}'") != std::string::npos);
  CHECK(error_of([] { Regex("((a{1000}){1000}){1000}"); }).find("expected at most 32768 NFA instructions") !=
        std::string::npos);
}

TEST_CASE("Regex: groups nest at most 100 deep") {
  const auto nested = [](std::size_t depth) { return std::string(depth, '(') + "a" + std::string(depth, ')'); };
  CHECK(Regex(nested(100)).full_match("a"));
  CHECK(Regex(std::string(50, '(') + "(?:" + std::string(49, '(') + "a" + std::string(100, ')')).full_match("a"));
  const std::string msg = error_of([&] { Regex(nested(101)); });
  CHECK(msg.find("malformed regex at position 100") != std::string::npos);
  CHECK(msg.find("expected at most 100 nested groups, got a deeper group") != std::string::npos);
  // far deeper than any stack would take if the parser recursed without a bound
  CHECK(error_of([&] { Regex(nested(4000), 100000); }).find("nested groups") != std::string::npos);
}

namespace {

// Random patterns from the subset on which Python's re and ECMAScript agree for full
// matches of texts without '\n' or '\r': no '{' literal, no ']' first in a class, no \s
// beyond ' ' in the texts, anchors never quantified.
class PatternGen {
public:
  explicit PatternGen(std::uint64_t seed) : gen_(seed) {}

  std::string alternation(int depth) {
    std::string out = concat(depth);
    while (pick(4) == 0) out += "|" + concat(depth);
    return out;
  }

  std::string text() {
    static const char alphabet[] = "abc_.1 -";
    std::string out;
    const std::size_t n = pick(8);
    for (std::size_t i = 0; i < n; ++i) out += alphabet[pick(sizeof(alphabet) - 1)];
    return out;
  }

private:
  std::mt19937_64 gen_;

  std::size_t pick(std::size_t n) { return static_cast<std::size_t>(gen_() % n); }

  std::string concat(int depth) {
    std::string out;
    const std::size_t n = pick(4);
    for (std::size_t i = 0; i < n; ++i) out += item(depth);
    return out;
  }

  std::string item(int depth) {
    static const char* const atoms[] = {"a",      "b",      "c",   "_",   "\\.",    ".",    "\\d",
                                        "\\w",    "\\s",    "\\D", "\\W", "[ab]",   "[^a]", "[a-c1]",
                                        "[\\d_]", "[.\\-]", "1",   "\\-", "[^\\w]", "\\S"};
    const std::size_t k = pick(depth < 3 ? 26 : 20);
    std::string atom;
    if (k < 20) {
      atom = atoms[k];
    } else if (k < 22) {
      return k == 20 ? "^" : "$";
    } else {
      atom = (k < 24 ? "(" : "(?:") + alternation(depth + 1) + ")";
    }
    static const char* const quantifiers[] = {"*", "+", "?", "*?", "+?", "??", "{2}", "{1,}", "{0,2}", "{1,3}"};
    if (pick(3) == 0) atom += quantifiers[pick(10)];
    return atom;
  }
};

}  // namespace

TEST_CASE("Regex: agrees with std::regex (ECMAScript, regex_match) on random patterns and texts") {
  PatternGen gen(20261201);
  std::size_t compared = 0, matched = 0;
  for (int i = 0; i < 3000; ++i) {
    const std::string pattern = gen.alternation(0);
    const Regex mine(pattern);
    const std::regex theirs(pattern, std::regex::ECMAScript);
    for (int j = 0; j < 8; ++j) {
      const std::string text = gen.text();
      const bool expected = std::regex_match(text, theirs);
      if (mine.full_match(text) != expected) {
        CAPTURE(pattern);
        CAPTURE(text);
        CHECK(mine.full_match(text) == expected);
      }
      ++compared;
      matched += expected ? 1 : 0;
    }
  }
  CHECK(compared == 24000);
  // both outcomes are well represented, so the agreement says something
  CHECK(matched > compared / 20);
  CHECK(matched < compared / 2);
  MESSAGE("random cross-check: " << matched << " of " << compared << " texts matched");
}

}  // namespace test_regex
