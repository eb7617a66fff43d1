"""Ray job: bulk scoring of a bucket of studies -> Parquet.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/score.py --input s3://bucket/rsna --models s3://bucket/models@champion \
                             --out s3://bucket/scores --split test
"""

import sys

from lumbar_ray.scoring.job import run

if __name__ == "__main__":
    sys.exit(run())
