"""Ray job (scheduled, e.g. by a KubeRay RayCronJob): retrain and promote only a better model.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/retrain.py --data s3://bucket/rsna --registry s3://bucket/models --folds 5
"""

import sys

from lumbar_ray.training.retrain_job import run

if __name__ == "__main__":
    sys.exit(run())
