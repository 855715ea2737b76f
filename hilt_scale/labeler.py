"""Label reports with CT-RATE's 18 abnormality classes (rule-based): ``python -m hilt_scale.labeler``.

The labeler itself lives in ``hilt_scale.evaluation.labeler``; its docstring gives the usage.
"""

from hilt_scale.evaluation.labeler import main

if __name__ == "__main__":
    main()
