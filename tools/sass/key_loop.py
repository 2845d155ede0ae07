"""Instruction mix of each kernel's key loop in an nvdisasm listing (tools/sass/hot-loops.sh).

A loop is the address range from a backward branch's target to the branch. Each kernel's key
loop is the loop with the most HMMA instructions (the smallest such range on a tie), and the
counts are static: every instruction in the range once, so they equal the instructions a warp
issues per iteration only when the loop body has no untaken paths (the probes of
probe_attention.cu fold theirs away).

usage: key_loop.py LISTING [KERNEL_PREFIX]
"""
import collections
import re
import sys

GROUPS = [
    ("tensor core (HMMA)", {"HMMA"}),
    ("ldmatrix (LDSM)", {"LDSM"}),
    ("other shared loads (LDS)", {"LDS"}),
    ("async copies (LDGSTS)", {"LDGSTS"}),
    ("MUFU (ex2, rcp)", {"MUFU"}),
    ("float ALU", {"FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "F2FP", "FCHK"}),
    ("shuffles", {"SHFL"}),
    ("branches, barriers, warp sync", {"BRA", "BAR", "WARPSYNC", "BSSY", "BSYNC", "DEPBAR"}),
]


def parse(lines):
    """{kernel: [(address, opcode)]} and {kernel: {label: address}}."""
    insts, labels = collections.defaultdict(list), collections.defaultdict(dict)
    kernel, pending = None, []
    for line in lines:
        m = re.match(r"^\.text\.(\w+):", line)
        if m:
            kernel, pending = m.group(1), []
            continue
        if kernel is None:
            continue
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if m:
            addr = int(m.group(1), 16)
            for label in pending:
                labels[kernel][label] = addr
            pending = []
            insts[kernel].append((addr, m.group(2)))
    return insts, labels


def opcode(text):
    text = re.sub(r"^@!?U?P\w+\s+", "", text)
    return text.split()[0].split(".")[0]


def key_loop(insts, labels):
    index = {a: i for i, (a, _) in enumerate(insts)}
    best = None
    for i, (addr, text) in enumerate(insts):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if not m or labels.get(m.group(1), addr + 1) > addr:
            continue
        start = index[labels[m.group(1)]]
        ops = collections.Counter(opcode(t) for _, t in insts[start:i + 1])
        key = (ops["HMMA"], -(i - start))
        if ops["HMMA"] and (best is None or key > best[0]):
            best = (key, start, i, ops)
    return best


def main():
    insts, labels = parse(open(sys.argv[1]).read().split("\n"))
    prefix = sys.argv[2] if len(sys.argv) > 2 else ""
    for kernel in sorted(insts):
        if not kernel.startswith(prefix):
            continue
        found = key_loop(insts[kernel], labels[kernel])
        if found is None:
            print(f"{kernel}: no loop with HMMA")
            continue
        _, start, end, ops = found
        total = end - start + 1
        grouped = []
        seen = set()
        for name, members in GROUPS:
            n = sum(ops[o] for o in members)
            seen |= members
            grouped.append(f"{name} {n}")
        rest = sum(n for o, n in ops.items() if o not in seen)
        print(f"{kernel}: key loop {insts[kernel][start][0]:#x}..{insts[kernel][end][0]:#x}, "
              f"{total} instructions: " + ", ".join(grouped) + f", integer and other {rest}")


if __name__ == "__main__":
    main()
