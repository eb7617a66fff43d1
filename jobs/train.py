"""Ray job: cross-validated training -> a new registry version.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --data s3://bucket/rsna --out s3://bucket/models --folds 5
"""

import sys

from lumbar_ray.training.job import run

if __name__ == "__main__":
    sys.exit(run())
