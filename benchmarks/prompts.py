"""Varied code-completion prompts for the benchmarks, with realistic spread in length.

    python benchmarks/prompts.py OUT.jsonl --prompts 180 [--seed 0]

Each prompt is a function in one of five languages that ends where its body opens, as an
evaluation set's do: a doc comment of one to twelve lines (a summary, then details, argument notes
and worked examples), then the signature. Lengths run from about 20 to 300 tokens, unlike one
short prompt repeated. Rows: ``{"task_id", "prompt", "language"}``; the order is shuffled (seeded),
so length-sorted planning has work to do.
"""

from __future__ import annotations

import argparse
import json
import random

# (name, arguments, returns, summary, details): details feed the longer doc comments
TASKS = [
    ("sum_of_squares", [("xs", "list of ints")], "int", "Returns the sum of the squares of xs.",
     ["An empty list sums to 0.", "Negative numbers square to positive ones.", "sum_of_squares([1, 2, 3]) == 14"]),
    ("is_palindrome", [("s", "string")], "bool", "Returns true if s reads the same backwards.",
     ["Case matters: 'Aa' is not a palindrome.", "The empty string is a palindrome.",
      "is_palindrome('level') == true", "is_palindrome('lever') == false"]),
    ("gcd", [("a", "int"), ("b", "int")], "int", "Returns the greatest common divisor of a and b.",
     ["Uses Euclid's algorithm.", "gcd(0, b) is b.", "gcd(12, 18) == 6", "Both arguments are non-negative."]),
    ("count_vowels", [("s", "string")], "int", "Counts the vowels in s.",
     ["Vowels are a, e, i, o and u, in either case.", "count_vowels('Hello') == 2", "Y is not a vowel here."]),
    ("fibonacci", [("n", "int")], "int", "Returns the n-th Fibonacci number.",
     ["fibonacci(0) == 0 and fibonacci(1) == 1.", "Runs in linear time, without recursion.",
      "fibonacci(10) == 55", "n is at most 90, so the result fits in 64 bits."]),
    ("is_prime", [("n", "int")], "bool", "Returns true if n is a prime number.",
     ["Numbers below 2 are not prime.", "Trial division up to the square root of n is enough.",
      "is_prime(97) == true", "is_prime(91) == false, since 91 == 7 * 13."]),
    ("clamp", [("x", "int"), ("lo", "int"), ("hi", "int")], "int", "Returns x limited to [lo, hi].",
     ["If x < lo the result is lo; if x > hi it is hi.", "lo <= hi always holds.", "clamp(15, 0, 10) == 10"]),
    ("reverse_words", [("s", "string")], "string", "Returns s with its words in reverse order.",
     ["Words are separated by single spaces.", "reverse_words('the quick fox') == 'fox quick the'",
      "Leading and trailing spaces are not present."]),
    ("max_subarray", [("xs", "list of ints")], "int", "Returns the largest sum of a contiguous subarray.",
     ["Kadane's algorithm does it in one pass.", "xs is not empty.", "max_subarray([-2, 1, -3, 4, -1, 2, 1]) == 6",
      "If every number is negative, the answer is the largest of them."]),
    ("binary_search", [("xs", "sorted list of ints"), ("target", "int")], "int",
     "Returns the index of target in xs, or -1.",
     ["xs is sorted in increasing order and holds distinct values.", "Runs in logarithmic time.",
      "binary_search([1, 3, 5, 7], 5) == 2", "binary_search([1, 3, 5, 7], 4) == -1"]),
    ("word_count", [("s", "string")], "int", "Returns the number of words in s.",
     ["A word is a maximal run of non-space characters.", "word_count('  a  b ') == 2"]),
    ("celsius_to_fahrenheit", [("c", "float")], "float", "Converts a temperature from Celsius to Fahrenheit.",
     ["F = C * 9 / 5 + 32.", "celsius_to_fahrenheit(100) == 212"]),
    ("second_largest", [("xs", "list of ints")], "int", "Returns the second largest distinct value in xs.",
     ["xs holds at least two distinct values.", "second_largest([4, 1, 4, 3]) == 3",
      "Duplicates of the largest value do not count twice."]),
    ("run_length_encode", [("s", "string")], "string", "Encodes s as runs of a character and its count.",
     ["run_length_encode('aaabcc') == 'a3b1c2'", "The empty string encodes to the empty string.",
      "Counts above 9 are written in full: 'a12'."]),
    ("matrix_trace", [("m", "square matrix of ints")], "int", "Returns the sum of the main diagonal of m.",
     ["m has as many rows as columns.", "matrix_trace([[1, 2], [3, 4]]) == 5"]),
    ("balanced_brackets", [("s", "string")], "bool", "Returns true if the brackets in s are balanced.",
     ["Brackets are (), [] and {}; other characters are ignored.", "balanced_brackets('{[()]}') == true",
      "balanced_brackets('([)]') == false", "A stack of open brackets is the usual way."]),
    ("digit_sum", [("n", "int")], "int", "Returns the sum of the decimal digits of n.",
     ["n is non-negative.", "digit_sum(1234) == 10"]),
    ("rotate_left", [("xs", "list of ints"), ("k", "int")], "list of ints", "Rotates xs left by k places.",
     ["k may exceed the length of xs: rotate by k modulo the length.", "rotate_left([1, 2, 3, 4], 1) == [2, 3, 4, 1]",
      "An empty list stays empty."]),
    ("median", [("xs", "list of floats")], "float", "Returns the median of xs.",
     ["xs is not empty and need not be sorted.", "With an even count, the median is the mean of the middle two.",
      "median([3, 1, 2]) == 2", "median([4, 1, 2, 3]) == 2.5"]),
    ("count_islands", [("grid", "grid of 0s and 1s")], "int", "Counts the islands of 1s in grid.",
     ["Cells connect up, down, left and right, not diagonally.", "A depth-first search from each unseen 1 works.",
      "count_islands([[1, 0], [0, 1]]) == 2", "An empty grid has no islands."]),
    ("to_binary", [("n", "int")], "string", "Returns the binary representation of n.",
     ["n is non-negative.", "to_binary(0) == '0'", "to_binary(10) == '1010'"]),
    ("anagrams", [("a", "string"), ("b", "string")], "bool", "Returns true if a and b are anagrams.",
     ["Only letters count, and case does not.", "anagrams('Listen', 'Silent') == true"]),
    ("mean_absolute_deviation", [("xs", "list of floats")], "float",
     "Returns the mean absolute deviation of xs around its mean.",
     ["MAD = average of |x - mean| over all x.", "xs is not empty.", "mean_absolute_deviation([1, 2, 3, 4]) == 1.0"]),
    ("longest_common_prefix", [("words", "list of strings")], "string", "Returns the longest prefix of every word.",
     ["An empty list has the empty prefix.", "longest_common_prefix(['flower', 'flow', 'flight']) == 'fl'",
      "Compare character by character until one word ends or two differ."]),
]

TYPES = {
    "java": {"int": "int", "bool": "boolean", "string": "String", "float": "double", "list of ints": "int[]",
             "list of floats": "double[]", "list of strings": "String[]", "sorted list of ints": "int[]",
             "square matrix of ints": "int[][]", "grid of 0s and 1s": "int[][]"},
    "c": {"int": "long", "bool": "int", "string": "const char *", "float": "double", "list of ints": "const int *",
          "list of floats": "const double *", "list of strings": "const char **", "sorted list of ints": "const int *",
          "square matrix of ints": "const int **", "grid of 0s and 1s": "const int **"},
    "rust": {"int": "i64", "bool": "bool", "string": "&str", "float": "f64", "list of ints": "&[i64]",
             "list of floats": "&[f64]", "list of strings": "&[&str]", "sorted list of ints": "&[i64]",
             "square matrix of ints": "&[Vec<i64>]", "grid of 0s and 1s": "&[Vec<u8>]"},
    "go": {"int": "int", "bool": "bool", "string": "string", "float": "float64", "list of ints": "[]int",
           "list of floats": "[]float64", "list of strings": "[]string", "sorted list of ints": "[]int",
           "square matrix of ints": "[][]int", "grid of 0s and 1s": "[][]int"},
}


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def prompt(task: tuple, language: str, lines: int) -> str:
    name, args, returns, summary, details = task
    doc = [summary, *details[: max(0, lines - 1)]]
    doc += [f"{a}: the {t} to work on." for a, t in args][: max(0, lines - 1 - len(details))]
    if language == "java":
        body = "\n".join(f" * {d}" for d in doc)
        params = ", ".join(f"{TYPES['java'][t]} {a}" for a, t in args)
        return f"/**\n{body}\n */\npublic static {TYPES['java'][returns]} {camel(name)}({params}) {{"
    if language == "c":
        body = "\n".join(f" * {d}" for d in doc)
        params = ", ".join(f"{TYPES['c'][t]} {a}" + (", size_t n" if "list" in t else "") for a, t in args)
        return f"/*\n{body}\n */\n{TYPES['c'][returns]} {name}({params}) {{"
    if language == "rust":
        body = "\n".join(f"/// {d}" for d in doc)
        params = ", ".join(f"{a}: {TYPES['rust'][t]}" for a, t in args)
        ret = {"string": "String", "list of ints": "Vec<i64>"}.get(returns, TYPES["rust"][returns])
        return f"{body}\npub fn {name}({params}) -> {ret} {{"
    if language == "go":
        body = "\n".join(f"// {d}" for d in doc)
        params = ", ".join(f"{a} {TYPES['go'][t]}" for a, t in args)
        return f"{body}\nfunc {camel(name).title()[0] + camel(name)[1:]}({params}) {TYPES['go'][returns]} {{"
    if language == "javascript":
        body = "\n".join(f" * {d}" for d in doc)
        params = ", ".join(a for a, _ in args)
        return f"/**\n{body}\n */\nfunction {camel(name)}({params}) {{"
    raise ValueError(language)


LANGUAGES = ["java", "c", "rust", "go", "javascript"]


def varied_prompts(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        language = LANGUAGES[(i // len(TASKS) + i) % len(LANGUAGES)]
        lines = rng.choice([1, 1, 2, 3, 4, 5, 6, 8, 10, 12])
        rows.append({"task_id": f"{language}/{task[0]}/{i}", "prompt": prompt(task, language, lines),
                     "language": language})
    rng.shuffle(rows)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--prompts", type=int, default=180)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with open(args.out, "w") as f:
        for row in varied_prompts(args.prompts, args.seed):
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
