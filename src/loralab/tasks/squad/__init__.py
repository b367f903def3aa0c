"""SQuAD v1.1 question answering: data (:mod:`.data`), encoder span features and best-span search
(:mod:`.span`), the seed's generative format (:mod:`.generative`); metrics in :mod:`loralab.metrics.squad`."""
