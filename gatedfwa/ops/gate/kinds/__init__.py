"""The gates gatedfwa ships, one module each; each defines GATE, its GateSpec (spec.py).
registry.py collects them into GATES.

    sharpened.py   g = logsigmoid(beta a) / beta, beta = 1 + ELU(beta_pre)   (the default)
    forgetting.py  g = logsigmoid(a)
"""
