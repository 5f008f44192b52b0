"""The pure tensor math: the one loss (:mod:`objective`, the only place where gradients
flow), the weight builders (:mod:`weights`, one per method, over :mod:`token_weights`),
rewards to advantages (:mod:`advantages`), ratios to the behaviour policy
(:mod:`importance`) and the loss normaliser (:mod:`aggregation`). Nothing here knows
Lightning, configs or models."""
