"""Caption-set scoring: ``recon score``, ``recon analyze`` and ``recon metaeval``.

    inputs.py           caption files, references, and the items they make with an image folder
    caption_metrics.py  reference metrics through pycocoevalcap (corpus BLEU / METEOR statistics), CLIPScore
    run.py              score_caption_sets (records, aggregates, leaderboards)
    scorers.py          the models a score run loads besides the reconstructor (CLIPScore's CLIP, SBERT)
    analyze.py          recon analyze: correlations of a score run's metrics
    tables.py           leaderboards, paired tests and correlations (markdown); recon.stats does the statistics
    html.py             the score report and leaderboard pages (recon.report's gallery)
    metaeval.py         recon metaeval: agreement of every metric with human judgments
    metaeval_formats.py the judgment sets' released formats
    selection.py experiment_data.py   helpers of the experiments/ scripts
    commands.py         argparse wiring of score / analyze / metaeval

Nothing here is imported at ``import recon``; the CLI imports ``commands`` only, which loads the rest on use.
"""
