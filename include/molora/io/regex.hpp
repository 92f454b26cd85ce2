// A regular-expression matcher for PEFT's target_modules string, which PEFT full-matches
// against each module path with Python's `re`. Patterns come from untrusted config files, so
// the matcher is built not to blow up: the pattern is parsed (recursion bounded by the group
// nesting limit) into a Thompson NFA, and a match runs a state-set simulation over the text
// with no recursion and no backtracking, in O(program size x text length) time and
// O(program size) memory. It supports the subset real configs use (literals, escapes, `.`,
// classes, groups, alternation, greedy and lazy quantifiers, bounded repetition, ^ and $);
// every other construct, and every malformed pattern, is a molora::format_error naming the
// construct, its position and the pattern. Patterns must be ASCII; text is matched byte by
// byte, which for ASCII module paths is Python's semantics (in a non-ASCII text, `.`, a
// negated class and \D \W \S match one byte of a UTF-8 sequence where Python matches the
// whole character).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../errors.hpp"

namespace molora::io {

namespace internal {

// 256-bit set of bytes.
struct RegexByteSet {
  std::array<std::uint64_t, 4> bits{};

  void add(unsigned char c) noexcept { bits[c >> 6] |= std::uint64_t{1} << (c & 63); }
  void add_range(unsigned char lo, unsigned char hi) noexcept {
    for (unsigned c = lo; c <= hi; ++c) add(static_cast<unsigned char>(c));
  }
  void add(const RegexByteSet& o) noexcept {
    for (std::size_t i = 0; i < 4; ++i) bits[i] |= o.bits[i];
  }
  void invert() noexcept {
    for (auto& w : bits) w = ~w;
  }
  bool has(unsigned char c) const noexcept { return (bits[c >> 6] >> (c & 63)) & 1U; }
};

// One NFA instruction. kByte consumes one byte in sets[arg0] and goes on to the next
// instruction; kSplit continues at both arg0 and arg1; kJump at arg0; kBegin and kEnd are
// the ^ and $ assertions.
struct RegexInst {
  enum Op : std::uint8_t { kByte, kSplit, kJump, kBegin, kEnd, kMatch };
  Op op;
  std::uint32_t arg0 = 0;
  std::uint32_t arg1 = 0;
};

struct RegexProgram {
  std::vector<RegexInst> insts;
  std::vector<RegexByteSet> sets;
};

// Parse tree; children and byte sets are indices into the parser's vectors.
struct RegexNode {
  enum Kind : std::uint8_t { kEmpty, kSet, kBegin, kEnd, kConcat, kAlternation, kGroup, kRepeat };
  Kind kind;
  std::uint32_t set = 0;                // kSet: index into RegexProgram::sets
  std::vector<std::uint32_t> children;  // kConcat, kAlternation: the parts; kGroup, kRepeat: one
  std::uint32_t min = 0, max = 0;       // kRepeat; max == kUnbounded for no upper bound
  static constexpr std::uint32_t kUnbounded = std::numeric_limits<std::uint32_t>::max();
};

inline constexpr std::size_t kMaxRegexNesting = 100;                 // groups inside groups
inline constexpr std::uint32_t kMaxRegexRepeat = 1000;               // n and m of {n,m}
inline constexpr std::size_t kRegexInstsPerByte = 8;                 // program size cap per allowed pattern byte
inline constexpr std::size_t kMaxRegexInsts = std::size_t{1} << 31;  // indices are 32-bit

// The pattern as it appears in a message: printable ASCII as is, other bytes as \xHH, cut
// after 200 bytes so that a hostile pattern does not make a huge message.
inline std::string regex_quote(std::string_view p) {
  constexpr std::size_t kShown = 200;
  static const char* const hex = "0123456789abcdef";
  std::string out = "'";
  for (std::size_t i = 0; i < p.size() && i < kShown; ++i) {
    const auto c = static_cast<unsigned char>(p[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  out += "'";
  if (p.size() > kShown) out += molora::detail::cat(" (first ", kShown, " of ", p.size(), " bytes)");
  return out;
}

inline RegexByteSet regex_digit_set() {
  RegexByteSet s;
  s.add_range('0', '9');
  return s;
}
inline RegexByteSet regex_word_set() {
  RegexByteSet s;
  s.add_range('a', 'z');
  s.add_range('A', 'Z');
  s.add_range('0', '9');
  s.add('_');
  return s;
}
// Python's \s on str patterns, restricted to ASCII: space, \t \n \v \f \r and \x1c-\x1f.
inline RegexByteSet regex_space_set() {
  RegexByteSet s;
  s.add(' ');
  s.add_range('\t', '\r');
  s.add_range(0x1c, 0x1f);
  return s;
}

inline bool regex_is_digit(char c) noexcept {
  return c >= '0' && c <= '9';
}
inline bool regex_is_alpha(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
inline int regex_hex_value(char c) noexcept {
  if (regex_is_digit(c)) return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Recursive-descent parser over Python's grammar for the supported subset. Recursion only
// happens at '(' and is bounded by kMaxRegexNesting.
class RegexParser {
public:
  RegexParser(std::string_view pattern, std::string_view field, RegexProgram& program)
      : p_(pattern), field_(field), prog_(program) {}

  // Parses the whole pattern; returns the root node.
  std::uint32_t parse() {
    // Python reads a str pattern as code points and the matcher reads bytes; the two agree
    // only on ASCII, so a non-ASCII byte (a UTF-8 sequence in the pattern) is rejected.
    for (std::size_t i = 0; i < p_.size(); ++i)
      if (static_cast<unsigned char>(p_[i]) >= 0x80) {
        const std::string quoted = regex_quote(p_.substr(i, 1));  // '\xHH'
        unsupported(i, "non-ASCII byte " + quoted.substr(1, quoted.size() - 2));
      }
    const std::uint32_t root = alternation(0);
    if (pos_ < p_.size()) malformed(pos_, "a '(' before this ')'", "an unbalanced ')'");
    return root;
  }

  const std::vector<RegexNode>& nodes() const noexcept { return nodes_; }

private:
  std::string_view p_;
  std::string_view field_;
  RegexProgram& prog_;
  std::vector<RegexNode> nodes_;
  std::size_t pos_ = 0;

  [[noreturn]] void unsupported(std::size_t at, std::string_view construct) const {
    throw format_error(molora::detail::cat(field_, ": unsupported regex construct '", construct, "' at position ", at,
                                           " in pattern ", regex_quote(p_)));
  }
  [[noreturn]] void malformed(std::size_t at, std::string_view expected, std::string_view got) const {
    throw format_error(molora::detail::cat(field_, ": malformed regex at position ", at, " in pattern ",
                                           regex_quote(p_), ": expected ", expected, ", got ", got));
  }

  bool at_end() const noexcept { return pos_ >= p_.size(); }
  char peek() const noexcept { return p_[pos_]; }

  std::uint32_t add_node(RegexNode n) {
    nodes_.push_back(std::move(n));
    return static_cast<std::uint32_t>(nodes_.size() - 1);
  }
  std::uint32_t add_set(const RegexByteSet& s) {
    prog_.sets.push_back(s);
    RegexNode n{RegexNode::kSet, static_cast<std::uint32_t>(prog_.sets.size() - 1), {}, 0, 0};
    return add_node(std::move(n));
  }

  std::uint32_t alternation(std::size_t depth) {
    std::vector<std::uint32_t> alts{concat(depth)};
    while (!at_end() && peek() == '|') {
      ++pos_;
      alts.push_back(concat(depth));
    }
    if (alts.size() == 1) return alts[0];
    return add_node(RegexNode{RegexNode::kAlternation, 0, std::move(alts), 0, 0});
  }

  std::uint32_t concat(std::size_t depth) {
    std::vector<std::uint32_t> items;
    bool last_is_repeat = false;  // a quantifier right after a quantifier is "multiple repeat"
    while (!at_end() && peek() != '|' && peek() != ')') {
      const std::size_t here = pos_;
      std::uint32_t min = 0, max = 0;
      if (quantifier(min, max)) {
        if (items.empty()) malformed(here, "an item before the quantifier", "nothing to repeat");
        if (last_is_repeat) malformed(here, "an item before the quantifier", "a second quantifier");
        const RegexNode::Kind k = nodes_[items.back()].kind;
        if (k == RegexNode::kBegin || k == RegexNode::kEnd)
          malformed(here, "an item before the quantifier", "an anchor");
        if (!at_end() && peek() == '+') unsupported(here, std::string(p_.substr(here, pos_ + 1 - here)));
        if (!at_end() && peek() == '?') ++pos_;  // lazy: same set of full matches as greedy
        items.back() = add_node(RegexNode{RegexNode::kRepeat, 0, {items.back()}, min, max});
        last_is_repeat = true;
        continue;
      }
      items.push_back(atom(depth));
      last_is_repeat = false;
    }
    if (items.empty()) return add_node(RegexNode{RegexNode::kEmpty, 0, {}, 0, 0});
    if (items.size() == 1) return items[0];
    return add_node(RegexNode{RegexNode::kConcat, 0, std::move(items), 0, 0});
  }

  // Reads a quantifier at pos_ if there is one. As in Python, a '{' that does not start
  // {n}, {n,}, {,m} or {n,m} is a literal.
  bool quantifier(std::uint32_t& min, std::uint32_t& max) {
    const char c = peek();
    if (c == '*' || c == '+' || c == '?') {
      ++pos_;
      min = c == '+' ? 1 : 0;
      max = c == '?' ? 1 : RegexNode::kUnbounded;
      return true;
    }
    if (c != '{') return false;
    const std::size_t here = pos_;
    std::size_t i = pos_ + 1;
    const std::size_t lo_begin = i;
    while (i < p_.size() && regex_is_digit(p_[i])) ++i;
    const std::size_t lo_end = i;
    std::size_t hi_begin = lo_begin, hi_end = lo_end;
    if (i < p_.size() && p_[i] == ',') {
      hi_begin = ++i;
      while (i < p_.size() && regex_is_digit(p_[i])) ++i;
      hi_end = i;
    }
    if (i >= p_.size() || p_[i] != '}' || (i == here + 1)) return false;  // "{}" too is a literal
    pos_ = i + 1;
    min = lo_begin == lo_end ? 0 : bound(here, p_.substr(lo_begin, lo_end - lo_begin));
    max = hi_begin == hi_end ? RegexNode::kUnbounded : bound(here, p_.substr(hi_begin, hi_end - hi_begin));
    if (hi_begin == lo_begin && hi_end == lo_end) max = min;  // {n}
    if (max < min) malformed(here, "a repeat count {n,m} with n <= m", molora::detail::cat("{", min, ",", max, "}"));
    return true;
  }

  std::uint32_t bound(std::size_t here, std::string_view digits) const {
    std::uint64_t v = 0;
    for (const char d : digits) {
      v = v * 10 + static_cast<std::uint64_t>(d - '0');
      if (v > kMaxRegexRepeat) break;
    }
    if (v > kMaxRegexRepeat)
      malformed(here, molora::detail::cat("a repeat count of at most ", kMaxRegexRepeat), std::string(digits));
    return static_cast<std::uint32_t>(v);
  }

  std::uint32_t atom(std::size_t depth) {
    const std::size_t here = pos_;
    const char c = p_[pos_++];
    switch (c) {
      case '(':
        return group(here, depth);
      case '[':
        return byte_class(here);
      case '\\': {
        RegexByteSet s;
        escape(here, false, s);
        return add_set(s);
      }
      case '.': {
        RegexByteSet s;
        s.add('\n');
        s.invert();
        return add_set(s);
      }
      case '^':
        return add_node(RegexNode{RegexNode::kBegin, 0, {}, 0, 0});
      case '$':
        return add_node(RegexNode{RegexNode::kEnd, 0, {}, 0, 0});
      default: {
        RegexByteSet s;
        s.add(static_cast<unsigned char>(c));
        return add_set(s);
      }
    }
  }

  std::uint32_t group(std::size_t here, std::size_t depth) {
    if (depth + 1 > kMaxRegexNesting)
      malformed(here, molora::detail::cat("at most ", kMaxRegexNesting, " nested groups"), "a deeper group");
    if (!at_end() && peek() == '?') {
      const std::string_view rest = p_.substr(pos_ + 1);
      if (!rest.empty() && rest[0] == ':') {
        pos_ += 2;
      } else if (rest.empty()) {
        malformed(pos_, "':' after '(?'", "end of pattern");
      } else {
        // name the construct: (?<= (?<! (?P< (?P= (?P> by their two characters, else one
        const bool two = rest.size() >= 2 && ((rest[0] == '<' && (rest[1] == '=' || rest[1] == '!')) ||
                                              (rest[0] == 'P' && (rest[1] == '<' || rest[1] == '=' || rest[1] == '>')));
        unsupported(here, std::string("(?") + std::string(rest.substr(0, two ? 2 : 1)));
      }
    }
    const std::uint32_t inner = alternation(depth + 1);
    if (at_end())
      malformed(pos_, molora::detail::cat("')' closing the group opened at position ", here), "end of pattern");
    ++pos_;  // ')'
    return add_node(RegexNode{RegexNode::kGroup, 0, {inner}, 0, 0});
  }

  // Reads the escape after the backslash at `here` into `s` (one byte or a category).
  // Returns true for a category (\d \w \s and their negations), false for a single byte.
  bool escape(std::size_t here, bool in_class, RegexByteSet& s) {
    if (at_end()) malformed(here, "a character after '\\'", "end of pattern");
    const char c = p_[pos_++];
    switch (c) {
      case 'd':
        s = regex_digit_set();
        return true;
      case 'w':
        s = regex_word_set();
        return true;
      case 's':
        s = regex_space_set();
        return true;
      case 'D':
        s = regex_digit_set();
        s.invert();
        return true;
      case 'W':
        s = regex_word_set();
        s.invert();
        return true;
      case 'S':
        s = regex_space_set();
        s.invert();
        return true;
      case 'n':
        s.add('\n');
        return false;
      case 't':
        s.add('\t');
        return false;
      case 'r':
        s.add('\r');
        return false;
      case 'f':
        s.add('\f');
        return false;
      case 'v':
        s.add('\v');
        return false;
      case 'a':
        s.add('\a');
        return false;
      case 'x': {
        const int h1 = pos_ < p_.size() ? regex_hex_value(p_[pos_]) : -1;
        const int h2 = pos_ + 1 < p_.size() ? regex_hex_value(p_[pos_ + 1]) : -1;
        if (h1 < 0 || h2 < 0)
          malformed(here, "two hex digits after '\\x'", "'" + std::string(p_.substr(here, 4)) + "'");
        if (h1 >= 8) unsupported(here, "non-ASCII code point " + std::string(p_.substr(here, 4)));
        pos_ += 2;
        s.add(static_cast<unsigned char>(h1 * 16 + h2));
        return false;
      }
      case 'b':
        if (in_class) {  // backspace inside a class, as in Python
          s.add('\b');
          return false;
        }
        break;
      default:
        break;
    }
    if (regex_is_digit(c)) unsupported(here, std::string("\\") + c);  // backreference or octal
    if (c == 'b' || c == 'B' || c == 'A' || c == 'Z' || c == 'p' || c == 'P' || c == 'N' || c == 'u' || c == 'U')
      unsupported(here, std::string("\\") + c);
    if (regex_is_alpha(c)) malformed(here, "a known escape", std::string("'\\") + c + "'");
    s.add(static_cast<unsigned char>(c));  // an escaped metacharacter or punctuation
    return false;
  }

  // Python's class syntax: ']' right after '[' or '[^' is a literal, '-' first or last is a
  // literal, a range needs single-byte ends in order.
  std::uint32_t byte_class(std::size_t here) {
    RegexByteSet s;
    const bool negate = !at_end() && peek() == '^';
    if (negate) ++pos_;
    const std::size_t first = pos_;
    for (;;) {
      if (at_end()) malformed(here, "']' closing the class", "end of pattern");
      const std::size_t item = pos_;
      const char c = p_[pos_++];
      if (c == ']' && item != first) break;
      RegexByteSet lo_set;
      bool lo_category = false;
      unsigned char lo = static_cast<unsigned char>(c);
      if (c == '\\') {
        lo_category = escape(item, true, lo_set);
        if (!lo_category) lo = first_byte(lo_set);
      }
      if (pos_ + 1 < p_.size() && peek() == '-' && p_[pos_ + 1] != ']') {
        ++pos_;  // '-'
        const std::size_t hi_at = pos_;
        const char d = p_[pos_++];
        RegexByteSet hi_set;
        bool hi_category = false;
        unsigned char hi = static_cast<unsigned char>(d);
        if (d == '\\') {
          hi_category = escape(hi_at, true, hi_set);
          if (!hi_category) hi = first_byte(hi_set);
        }
        const std::string range(p_.substr(item, pos_ - item));
        if (lo_category || hi_category) malformed(item, "a range between two single characters", "'" + range + "'");
        if (hi < lo) malformed(item, "a range whose start is not after its end (by byte value)", "'" + range + "'");
        s.add_range(lo, hi);
        continue;
      }
      if (lo_category)
        s.add(lo_set);
      else
        s.add(lo);
    }
    if (negate) s.invert();
    return add_set(s);
  }

  static unsigned char first_byte(const RegexByteSet& s) noexcept {
    for (unsigned c = 0; c < 256; ++c)
      if (s.has(static_cast<unsigned char>(c))) return static_cast<unsigned char>(c);
    return 0;
  }
};

// Emits the Thompson NFA of a parse tree. Recursion follows the tree, whose depth is bounded
// by the group nesting limit; every emitted instruction is counted against `max_insts`.
class RegexCompiler {
public:
  RegexCompiler(const std::vector<RegexNode>& nodes, RegexProgram& program, std::size_t max_insts,
                std::string_view field, std::string_view pattern)
      : nodes_(nodes), prog_(program), max_insts_(max_insts), field_(field), pattern_(pattern) {}

  void compile(std::uint32_t root) {
    emit(root);
    push(RegexInst{RegexInst::kMatch, 0, 0});
  }

private:
  const std::vector<RegexNode>& nodes_;
  RegexProgram& prog_;
  std::size_t max_insts_;
  std::string_view field_;
  std::string_view pattern_;

  std::uint32_t push(RegexInst i) {
    if (prog_.insts.size() >= max_insts_)
      throw format_error(molora::detail::cat(field_, ": regex program size: expected at most ", max_insts_,
                                             " NFA instructions, got more (bounded repetition {n,m} expands in place)",
                                             " in pattern ", regex_quote(pattern_)));
    prog_.insts.push_back(i);
    return static_cast<std::uint32_t>(prog_.insts.size() - 1);
  }
  std::uint32_t here() const noexcept { return static_cast<std::uint32_t>(prog_.insts.size()); }

  void emit(std::uint32_t id) {
    const RegexNode& n = nodes_[id];
    switch (n.kind) {
      case RegexNode::kEmpty:
        return;
      case RegexNode::kSet:
        push(RegexInst{RegexInst::kByte, n.set, 0});
        return;
      case RegexNode::kBegin:
        push(RegexInst{RegexInst::kBegin, 0, 0});
        return;
      case RegexNode::kEnd:
        push(RegexInst{RegexInst::kEnd, 0, 0});
        return;
      case RegexNode::kGroup:
        emit(n.children[0]);
        return;
      case RegexNode::kConcat:
        for (const auto c : n.children) emit(c);
        return;
      case RegexNode::kAlternation: {
        // split L1, next; L1: a; jump end; next: split L2, ...; last alternative
        std::vector<std::uint32_t> jumps;
        for (std::size_t i = 0; i + 1 < n.children.size(); ++i) {
          const std::uint32_t split = push(RegexInst{RegexInst::kSplit, 0, 0});
          prog_.insts[split].arg0 = here();
          emit(n.children[i]);
          jumps.push_back(push(RegexInst{RegexInst::kJump, 0, 0}));
          prog_.insts[split].arg1 = here();
        }
        emit(n.children.back());
        for (const auto j : jumps) prog_.insts[j].arg0 = here();
        return;
      }
      case RegexNode::kRepeat: {
        const std::uint32_t child = n.children[0];
        for (std::uint32_t i = 0; i < n.min; ++i) emit(child);
        if (n.max == RegexNode::kUnbounded) {
          // loop: split body, out; body; jump loop
          const std::uint32_t loop = push(RegexInst{RegexInst::kSplit, 0, 0});
          prog_.insts[loop].arg0 = here();
          emit(child);
          push(RegexInst{RegexInst::kJump, loop, 0});
          prog_.insts[loop].arg1 = here();
          return;
        }
        // max - min optional copies, nested: (e(e(e)?)?)?
        std::vector<std::uint32_t> splits;
        for (std::uint32_t i = n.min; i < n.max; ++i) {
          const std::uint32_t split = push(RegexInst{RegexInst::kSplit, 0, 0});
          prog_.insts[split].arg0 = here();
          splits.push_back(split);
          emit(child);
        }
        for (const auto s : splits) prog_.insts[s].arg1 = here();
        return;
      }
    }
  }
};

// Sparse set of instruction indices (Briggs-Torczon): O(1) insert, test and clear.
class RegexStateSet {
public:
  explicit RegexStateSet(std::size_t n) : dense_(n), sparse_(n) {}
  bool contains(std::uint32_t i) const noexcept {
    const std::uint32_t d = sparse_[i];
    return d < size_ && dense_[d] == i;
  }
  void insert(std::uint32_t i) noexcept {
    sparse_[i] = size_;
    dense_[size_++] = i;
  }
  void clear() noexcept { size_ = 0; }
  std::uint32_t size() const noexcept { return size_; }
  std::uint32_t operator[](std::uint32_t k) const noexcept { return dense_[k]; }

private:
  std::vector<std::uint32_t> dense_, sparse_;
  std::uint32_t size_ = 0;
};

// Adds `start` and everything reachable from it without consuming a byte to `set`, at text
// position `pos`. Iterative; every instruction enters the set at most once per position,
// and each entry counts one step.
inline void regex_closure(const RegexProgram& prog, RegexStateSet& set, std::vector<std::uint32_t>& stack,
                          std::uint32_t start, std::string_view text, std::size_t pos, std::size_t& steps) {
  stack.clear();
  stack.push_back(start);
  while (!stack.empty()) {
    const std::uint32_t pc = stack.back();
    stack.pop_back();
    if (set.contains(pc)) continue;
    set.insert(pc);
    ++steps;
    const RegexInst& in = prog.insts[pc];
    switch (in.op) {
      case RegexInst::kJump:
        stack.push_back(in.arg0);
        break;
      case RegexInst::kSplit:
        stack.push_back(in.arg1);
        stack.push_back(in.arg0);
        break;
      case RegexInst::kBegin:
        if (pos == 0) stack.push_back(pc + 1);
        break;
      case RegexInst::kEnd:  // Python's $: at the end, or before a newline that ends the text
        if (pos == text.size() || (pos + 1 == text.size() && text[pos] == '\n')) stack.push_back(pc + 1);
        break;
      case RegexInst::kByte:
      case RegexInst::kMatch:
        break;
    }
  }
}

// True when the program matches all of `text`. `steps` receives the number of state-set
// entries made, at most program size x (text size + 1).
inline bool regex_run(const RegexProgram& prog, std::string_view text, std::size_t& steps) {
  steps = 0;
  const std::size_t n = prog.insts.size();
  RegexStateSet cur(n), next(n);
  std::vector<std::uint32_t> stack;
  stack.reserve(2 * n + 1);
  regex_closure(prog, cur, stack, 0, text, 0, steps);
  for (std::size_t pos = 0; pos < text.size(); ++pos) {
    if (cur.size() == 0) return false;
    const auto c = static_cast<unsigned char>(text[pos]);
    next.clear();
    for (std::uint32_t k = 0; k < cur.size(); ++k) {
      const std::uint32_t pc = cur[k];
      const RegexInst& in = prog.insts[pc];
      if (in.op == RegexInst::kByte && prog.sets[in.arg0].has(c))
        regex_closure(prog, next, stack, pc + 1, text, pos + 1, steps);
    }
    std::swap(cur, next);
  }
  for (std::uint32_t k = 0; k < cur.size(); ++k)
    if (prog.insts[cur[k]].op == RegexInst::kMatch) return true;
  return false;
}

}  // namespace internal

// A compiled pattern with Python `re.fullmatch` semantics over bytes (see the top of this
// header for the subset). Immutable after construction; full_match may be called from
// several threads at once.
class Regex {
public:
  static constexpr std::size_t kDefaultMaxPatternLength = 4096;

  // requires: nothing; a pattern longer than max_pattern_length bytes, malformed, or using
  //   a construct outside the subset throws format_error, whose message starts with `field`.
  // ensures: the compiled program holds at most kRegexInstsPerByte x max_pattern_length
  //   instructions (a pattern whose bounded repetitions expand beyond that throws).
  explicit Regex(std::string_view pattern, std::size_t max_pattern_length = kDefaultMaxPatternLength,
                 std::string_view field = "regex")
      : pattern_(pattern) {
    if (pattern.size() > max_pattern_length)
      throw format_error(molora::detail::cat(field, ": regex pattern length: expected at most ", max_pattern_length,
                                             " bytes, got ", pattern.size(), " in pattern ",
                                             internal::regex_quote(pattern)));
    internal::RegexParser parser(pattern, field, program_);
    const std::uint32_t root = parser.parse();
    const std::size_t bytes = std::max<std::size_t>(max_pattern_length, 1);
    const std::size_t cap = bytes < internal::kMaxRegexInsts / internal::kRegexInstsPerByte
                                ? internal::kRegexInstsPerByte * bytes
                                : internal::kMaxRegexInsts;
    internal::RegexCompiler(parser.nodes(), program_, cap, field, pattern).compile(root);
  }

  // True when the whole of `text` matches (Python's re.fullmatch). O(program_size() x
  // text.size()) time, O(program_size()) memory, no recursion.
  bool full_match(std::string_view text) const {
    std::size_t steps = 0;
    return internal::regex_run(program_, text, steps);
  }

  // As above; `steps` receives the simulation's work count, at most
  // program_size() x (text.size() + 1).
  bool full_match(std::string_view text, std::size_t& steps) const { return internal::regex_run(program_, text, steps); }

  const std::string& pattern() const noexcept { return pattern_; }
  std::size_t program_size() const noexcept { return program_.insts.size(); }

private:
  std::string pattern_;
  internal::RegexProgram program_;
};

}  // namespace molora::io
